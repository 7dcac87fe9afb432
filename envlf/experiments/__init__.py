"""Experiments that exercise the library end to end (runnable as ``python -m envlf.experiments.<name>``)."""
