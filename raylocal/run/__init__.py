"""Whole runs: the async run on Ray (parts phase, then the rest of the run)."""
