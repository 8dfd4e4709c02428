"""Benchmarks runnable as `gqa-t5 benchmark-...` (the scripts/ files call these)."""
