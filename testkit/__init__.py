"""Helpers shared by tests/ and bench/ (see processes.py, loadgen.py)."""
