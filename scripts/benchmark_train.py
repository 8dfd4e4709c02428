"""Shim: see gqa_t5/benchmarks/train.py (also `gqa-t5 benchmark-train`)."""
from gqa_t5.benchmarks.train import main
if __name__ == "__main__": raise SystemExit(main())
