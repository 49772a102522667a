"""Fieldbridge: bridge field protocols into normalized events."""

__version__ = "0.1.0"
