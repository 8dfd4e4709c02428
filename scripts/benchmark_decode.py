"""Shim: see gqa_t5/benchmarks/decode.py (also `gqa-t5 benchmark-decode`)."""
from gqa_t5.benchmarks.decode import main
if __name__ == "__main__": raise SystemExit(main())
