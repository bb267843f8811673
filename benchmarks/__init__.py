"""The project's benchmarks (``python tools/benchmark.py <name>``; docs/BENCHMARKS.md): kept
beside the package, not installed with it, and built on its modules as a user's code is."""
