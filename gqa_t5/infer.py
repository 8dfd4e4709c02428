"""`python -m gqa_t5.infer --gin_file=runs/infer.gin --gin.CHECKPOINT_PATH=... ...`: decode a
task's split with a checkpoint and write the predictions as JSON lines (gin configures
`gqa_t5.evaluation.infer`)."""

from __future__ import annotations

import sys
from typing import Optional, Sequence

from gqa_t5 import gin_utils


def main(argv: Optional[Sequence[str]] = None) -> int:
  return gin_utils.run_entry_point(argv, "gqa_t5.infer", "gqa_t5.evaluation.infer",
                                   __doc__.splitlines()[0])


if __name__ == "__main__":
  sys.exit(main())
