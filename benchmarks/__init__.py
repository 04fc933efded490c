"""Benchmarks: core microbenchmarks now; the storm simulator and real-host runs later."""
