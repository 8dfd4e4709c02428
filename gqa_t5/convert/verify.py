"""`gqa-t5 verify PATH`: read a converted checkpoint back and compare every tensor with the
CRC-32 its provenance file recorded when it was written (bit rot, a bad copy, a truncated
upload: the formats themselves check nothing).

  gqa-t5 verify /ckpt/t5_1_1_xxl_gqa8 [--quiet]

Exit status: 0 every tensor matches, 1 a mismatch or an unreadable tensor (each named), 2 no
provenance file or no checksums in it (a checkpoint not written by `gqa-t5 convert`, or written
with --no-checksums).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Dict, List, Optional, Sequence

from gqa_t5.checkpoints import checksums
from gqa_t5.checkpoints.detect import open_checkpoint
from gqa_t5.checkpoints.errors import CheckpointError
from gqa_t5.convert.converter import PROVENANCE_FILE


def recorded_checksums(path: str) -> Dict[str, str]:
  """{tensor name: 'crc32:...'} from PATH's provenance file; CheckpointError if it has none."""
  provenance = os.path.join(path, PROVENANCE_FILE)
  try:
    with open(provenance) as f:
      record = json.load(f)
  except FileNotFoundError:
    raise CheckpointError(f"{path} has no {PROVENANCE_FILE}: only checkpoints written by "
                          "`gqa-t5 convert` carry checksums") from None
  except (OSError, ValueError) as error:
    raise CheckpointError(f"cannot read {provenance}: {error}") from error
  sums = record.get("checksums") if isinstance(record, dict) else None
  if not isinstance(sums, dict) or not sums:
    raise CheckpointError(f"{provenance} records no checksums (written with --no-checksums, or "
                          "by a version before they were recorded)")
  return sums


def verify(path: str, report=None) -> List[str]:
  """The problems found (empty: every tensor matches), each naming the tensor. `report(name,
  ok)` is called after each tensor is checked."""
  expected = recorded_checksums(path)
  source = open_checkpoint(path, validate=False)
  problems = []
  for name in sorted(set(expected) - set(source.tensors)):
    problems.append(f"{name}: recorded in {PROVENANCE_FILE} but missing from the checkpoint")
  for name in sorted(set(source.tensors) - set(expected)):
    problems.append(f"{name}: in the checkpoint but has no recorded checksum")
  for name in sorted(set(expected) & set(source.tensors)):
    try:
      found = checksums.tensor_checksum(source.tensors[name].read())
    except CheckpointError as error:
      problems.append(f"{name}: cannot be read: {error}")
      ok = False
    else:
      ok = found == expected[name]
      if not ok:
        problems.append(f"{name}: checksum {found}, recorded {expected[name]} (the data "
                        "changed since it was written)")
    if report:
      report(name, ok)
  return problems


def main(argv: Optional[Sequence[str]] = None) -> int:
  parser = argparse.ArgumentParser(prog="gqa-t5 verify", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("path", help="a checkpoint written by `gqa-t5 convert`")
  parser.add_argument("--quiet", action="store_true", help="print nothing but problems")
  args = parser.parse_args(argv)
  try:
    problems = verify(args.path)
  except CheckpointError as error:
    print(f"gqa-t5 verify: error: {error}", file=sys.stderr)
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
