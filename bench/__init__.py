"""Benchmarks of the volunteer client (issue 5); see bench/README.md. Run as ``python -m bench.<name>``."""
