"""Benchmark scripts: ratios measured side by side in one run; results in docs/BENCHMARKS.md."""
