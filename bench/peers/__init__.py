"""Load generators, servers and consumers, each run as its own process by the harness."""
