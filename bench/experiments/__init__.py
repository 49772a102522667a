"""Experiments the bench runs on the daemon without changing its code (see each module)."""
