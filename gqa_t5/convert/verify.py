"""`gqa-t5 verify PATH`: read a checkpoint back and compare every tensor with the CRC-32
recorded when it was written (bit rot, a bad copy, a truncated upload: the formats themselves
check nothing).

  gqa-t5 verify /ckpt/t5_1_1_xxl_gqa8 [--quiet]       a checkpoint written by `gqa-t5 convert`
  gqa-t5 verify MODEL_DIR                              every checkpoint of a training run
  gqa-t5 verify MODEL_DIR/checkpoints/1000             one of them

A converted checkpoint records its sums in its provenance file, a training checkpoint in its
`checksums` item (checkpoints/model_dir.py).

Exit status: 0 every tensor matches, 1 a mismatch or an unreadable tensor (each named), 2 no
checksums recorded (a checkpoint not written by `gqa-t5 convert` or our trainer, or written
with --no-checksums / checksums=False).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Dict, List, Optional, Sequence, Tuple

from gqa_t5.checkpoints import checksums
from gqa_t5.checkpoints import model_dir as model_dir_lib
from gqa_t5.checkpoints import run_layout
from gqa_t5.checkpoints.detect import open_checkpoint
from gqa_t5.checkpoints.errors import CheckpointError, describe_os_error
from gqa_t5.convert.converter import PROVENANCE_FILE


def recorded_checksums(path: str) -> Dict[str, str]:
  """{tensor name: 'crc32:...'} from PATH's provenance file; CheckpointError if it has none."""
  provenance = os.path.join(path, PROVENANCE_FILE)
  try:
    with open(provenance) as f:
      record = json.load(f)
  except FileNotFoundError:
    raise CheckpointError(f"{path} has no {PROVENANCE_FILE}: only checkpoints written by "
                          "`gqa-t5 convert` or by our trainer carry checksums") from None
  except (OSError, ValueError) as error:
    raise CheckpointError(f"cannot read {provenance}: {error}") from error
  sums = record.get("checksums") if isinstance(record, dict) else None
  if not isinstance(sums, dict) or not sums:
    raise CheckpointError(f"{provenance} records no checksums (written with --no-checksums, or "
                          "by a version before they were recorded)")
  return sums


def verify(path: str, report=None) -> List[str]:
  """The problems found in a converted checkpoint (empty: every tensor matches), each naming
  the tensor. `report(name, ok)` is called after each tensor is checked."""
  expected = recorded_checksums(path)
  source = open_checkpoint(path, validate=False)
  return checksums.compare(expected, source.tensors, PROVENANCE_FILE, report)


def verify_training(path: str) -> List[Tuple[str, Optional[List[str]]]]:
  """[(checkpoint folder, its problems or None when it records no checksums)] of a MODEL_DIR
  (every checkpoint, oldest first) or of one training checkpoint folder."""
  if run_layout.is_training_checkpoint(path):
    folders = [path]
  else:
    folders = [os.path.join(run_layout.checkpoints_dir(path), str(step))
               for step in run_layout.checkpoint_steps(path)]
    if not folders:
      raise CheckpointError(f"{path} has a {run_layout.CHECKPOINTS_DIR}/ folder but no "
                            "checkpoint")
  return [(folder, model_dir_lib.verify_checkpoint(folder)) for folder in folders]


def _is_training(path: str) -> bool:
  return (os.path.isdir(os.path.join(path, run_layout.CHECKPOINTS_DIR))
          or run_layout.is_training_checkpoint(path))


def _main_training(path: str, quiet: bool) -> int:
  results = verify_training(path)
  problems = 0
  for folder, found in results:
    if found is None:
      print(f"gqa-t5 verify: {folder}: records no checksums (written before they were, or "
            "with checksums=False): not verified", file=sys.stderr)
      continue
    for problem in found:
      print(f"gqa-t5 verify: MISMATCH {folder}: {problem}", file=sys.stderr)
    problems += len(found)
    if not found and not quiet:
      print(f"{folder}: every tensor matches its recorded {checksums.ALGORITHM}")
  if problems:
    print(f"gqa-t5 verify: {path}: {problems} problem(s)", file=sys.stderr)
    return 1
  return 0 if any(found is not None for _, found in results) else 2


def main(argv: Optional[Sequence[str]] = None) -> int:
  parser = argparse.ArgumentParser(prog="gqa-t5 verify", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("path", help="a checkpoint written by `gqa-t5 convert`, a training run's "
                                   "MODEL_DIR, or one of its checkpoints")
  parser.add_argument("--quiet", action="store_true", help="print nothing but problems")
  args = parser.parse_args(argv)
  try:
    if _is_training(args.path):
      return _main_training(args.path, args.quiet)
    problems = verify(args.path)
  except CheckpointError as error:
    print(f"gqa-t5 verify: error: {error}", file=sys.stderr)
    return 2
  except OSError as error:  # an unreadable folder: one line naming it
    print(f"gqa-t5 verify: error: {describe_os_error(error)}", file=sys.stderr)
    return 2
  for problem in problems:
    print(f"gqa-t5 verify: MISMATCH {problem}", file=sys.stderr)
  if problems:
    print(f"gqa-t5 verify: {args.path}: {len(problems)} problem(s)", file=sys.stderr)
    return 1
  if not args.quiet:
    print(f"{args.path}: every tensor matches its recorded {checksums.ALGORITHM}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
