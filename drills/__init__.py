"""Fault and Serve drills: run from the repository root as ``python -m drills.<name>`` (RELIABILITY.md)."""
