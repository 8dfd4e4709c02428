"""`python -m gqa_t5.eval --gin_file=runs/eval.gin --gin.CHECKPOINT_PATH=... ...`: decode a
task's split with a checkpoint and report the task's metrics (gin configures
`gqa_t5.evaluation.evaluate`)."""

from __future__ import annotations

import sys
from typing import Optional, Sequence

from gqa_t5 import gin_utils


def main(argv: Optional[Sequence[str]] = None) -> int:
  return gin_utils.run_entry_point(argv, "gqa_t5.eval", "gqa_t5.evaluation.evaluate",
                                   __doc__.splitlines()[0])


if __name__ == "__main__":
  sys.exit(main())
