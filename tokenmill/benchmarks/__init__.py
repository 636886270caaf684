"""Benchmark clients: `tokenmill bench ...`."""
