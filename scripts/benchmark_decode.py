"""Decode speed per K against the memory roofline: see gqa_t5/benchmarks/decode.py."""

from gqa_t5.benchmarks.decode import main

if __name__ == "__main__":
  raise SystemExit(main())
