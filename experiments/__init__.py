"""Experiments behind the records in docs/experiments/: each module prints its table."""
