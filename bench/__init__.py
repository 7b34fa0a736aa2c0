"""Benchmarks for pipeline_core (run ``python -m bench.bench_core`` from the repo root)."""
