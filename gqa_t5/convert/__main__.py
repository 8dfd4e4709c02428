"""`python -m gqa_t5.convert ...` = `gqa-t5 convert ...`."""

import os
import sys

# The 'aligned' method runs many tiny SVDs; multi-threaded OpenBLAS spends far longer spinning
# up threads for them than computing (and nothing else here uses BLAS threads). Must be set
# before numpy is imported.
for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
  os.environ.setdefault(_var, "1")

from gqa_t5.convert.cli import main  # noqa: E402

if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
