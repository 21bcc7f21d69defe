"""Benchmarks that print tables; run through ``ehrmamba bench`` and documented in
docs/benchmarks.md. Never timed assertions in tests."""
