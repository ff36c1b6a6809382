"""Benchmarks: side-by-side measurements and load runs, not tests. See README: Benchmarks."""
