"""One module per scenario; each runs alone as ``python -m bench.scenarios.<name>``."""
