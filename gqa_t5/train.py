"""`python -m gqa_t5.train --gin_file=... --gin.MODEL_DIR=...`: train, uptrain or fine-tune.

Gin configures `gqa_t5.train_loop.train` (see gin/runs/*.gin). Extra flags:
  --dry_run               check everything and compile the step from shapes alone, print the
                          per-device memory estimate, and exit
  --dry_run_devices=N     simulate N CPU devices for the dry run (e.g. a pod slice's mesh)
  --coordinator_address / --num_processes / --process_id   multi-process runs
"""

from __future__ import annotations

import sys
from typing import Optional, Sequence

from gqa_t5 import gin_utils


def _add_flags(parser) -> None:
  parser.add_argument("--dry_run", action="store_true",
                      help="compile the train step abstractly, print memory per device, exit")
  parser.add_argument("--dry_run_devices", type=int, default=None,
                      help="number of simulated CPU devices for --dry_run")
  parser.add_argument("--no_progress", action="store_true", help="no progress bar")


def _call(fn, args) -> None:
  model_dir = gin_utils.macro_value("MODEL_DIR")
  fn(dry_run=args.dry_run or bool(args.dry_run_devices), progress=not args.no_progress,
     on_start=lambda: gin_utils.write_operative_config(
         None if args.dry_run or args.dry_run_devices else model_dir))


def main(argv: Optional[Sequence[str]] = None) -> int:
  return gin_utils.run_entry_point(argv, "gqa_t5.train", "gqa_t5.train_loop.train",
                                   __doc__.splitlines()[0], _add_flags, _call)


if __name__ == "__main__":
  sys.exit(main())
