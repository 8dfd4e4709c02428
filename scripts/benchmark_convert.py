"""Shim: see gqa_t5/benchmarks/convert.py (also `gqa-t5 benchmark-convert`)."""
from gqa_t5.benchmarks.convert import main
if __name__ == "__main__": raise SystemExit(main())
