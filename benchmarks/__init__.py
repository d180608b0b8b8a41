"""Hand-run benchmarks (``python -m benchmarks.<name>``); see benchmarks/README.md. Never timed tests."""
