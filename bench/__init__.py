"""Fieldbridge benchmarks: scenarios, load generators and results (not tests).

Run ``python -m bench`` (or ``bench/run``); see ``bench/README.md``.
"""
