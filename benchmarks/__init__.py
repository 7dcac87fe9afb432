"""Benchmarks that print tables (envlf bench ...): latency, load, first start."""
