"""Benchmarks for hookd; `python -m bench.replay` is the side-by-side corpus replay."""
