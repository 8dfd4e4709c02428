"""Per-tensor checksums: what we write carries one, so bit rot in any format is found later.

None of the formats we read checks its data (uncompressed and zstd zarr, OCDBT, safetensors and
torch's zip members carry no checksum anyone verifies), and we cannot change them. So the
converter records a CRC-32 of every tensor it writes in its provenance file, the trainer one of
every train-state tensor in each checkpoint (checkpoints/model_dir.py), and `gqa-t5 verify` and a
resuming trainer read the tensors back and compare. CRC-32 (zlib) of the tensor's C-order bytes
in native byte order: about 1 GB/s on one core, and it catches every burst error shorter than 32
bits.
"""

from __future__ import annotations

import zlib
from typing import Callable, Dict, List, Mapping, Optional

import numpy as np

from gqa_t5.checkpoints.errors import CheckpointError
from gqa_t5.checkpoints.lazy import LazyTensor

ALGORITHM = "crc32"


def tensor_checksum(value) -> str:
  """'crc32:xxxxxxxx' of an array's C-order bytes in native byte order (dtype and layout as
  read, so the same tensor gives the same sum in every format)."""
  value = np.asarray(value)
  if value.dtype.byteorder not in ("=", "|"):
    value = value.astype(value.dtype.newbyteorder("="))
  data = np.ascontiguousarray(value).reshape(-1).view(np.uint8)
  return f"{ALGORITHM}:{zlib.crc32(data) & 0xFFFFFFFF:08x}"


def checksummed(tensor: LazyTensor, sums: Dict[str, str]) -> LazyTensor:
  """`tensor`, whose read also records its checksum in `sums[tensor.name]` (the writer reads
  each tensor once, so the sum costs no second read)."""

  def read():
    value = tensor.read()
    sums[tensor.name] = tensor_checksum(value)
    return value

  return LazyTensor(tensor.name, tensor.shape, tensor.dtype, read)


def compare(expected: Mapping[str, str], tensors: Mapping[str, LazyTensor], record: str,
            report: Optional[Callable[[str, bool], None]] = None) -> List[str]:
  """The problems found reading `tensors` back against the checksums `expected` (empty: every
  tensor matches), each naming the tensor; `record` names where the sums were recorded.
  `report(name, ok)` is called after each tensor is checked."""
  problems = []
  for name in sorted(set(expected) - set(tensors)):
    problems.append(f"{name}: recorded in {record} but missing from the checkpoint")
  for name in sorted(set(tensors) - set(expected)):
    problems.append(f"{name}: in the checkpoint but has no recorded checksum")
  for name in sorted(set(expected) & set(tensors)):
    try:
      found = tensor_checksum(tensors[name].read())
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
