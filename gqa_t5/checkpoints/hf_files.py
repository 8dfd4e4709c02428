"""The tensors of Hugging Face weight files: safetensors (our own streamed reader) and torch.

The safetensors reader parses the header and offsets itself, so it streams one tensor at a time,
handles bfloat16 and names the tensor when a file is truncated. `pytorch_model.bin` needs torch.
Every reader returns {HF name: (shape, dtype, read())}.
"""

from __future__ import annotations

import json
import math
import os
import struct
from typing import Any, Callable, Dict, Optional, Tuple

import numpy as np

from gqa_t5.checkpoints import confine
from gqa_t5.checkpoints import msgpack_codec
from gqa_t5.checkpoints.errors import CheckpointError

SAFETENSORS = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
TORCH_BIN = "pytorch_model.bin"
TORCH_BIN_INDEX = "pytorch_model.bin.index.json"

_MAX_HEADER_BYTES = 100 * 1024 * 1024  # the safetensors format's own limit
_SAFETENSORS_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "I64": np.int64, "I32": np.int32,
    "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}


# ------------------------------------------------------------------ safetensors (streamed)

def _safetensors_header(path: str) -> Tuple[Dict[str, Any], int]:
  """(header dict, byte offset of the data section), with the file checked against it."""
  try:
    size = os.path.getsize(path)
    with open(path, "rb") as f:
      raw = f.read(8)
      if len(raw) < 8:
        raise CheckpointError(f"safetensors file {path} is truncated ({size} bytes): no header")
      (header_len,) = struct.unpack("<Q", raw)
      if header_len > min(size - 8, _MAX_HEADER_BYTES):
        raise CheckpointError(f"safetensors file {path} is truncated or corrupt: header of "
                              f"{header_len} bytes in a {size}-byte file")
      header = json.loads(f.read(header_len))
  except CheckpointError:
    raise
  except (OSError, ValueError, UnicodeDecodeError) as error:
    raise CheckpointError(f"safetensors file {path} is corrupt: {error}") from error
  if not isinstance(header, dict):
    raise CheckpointError(f"safetensors file {path} is corrupt: its header is not a JSON object")
  data_start = 8 + header_len
  for name, info in header.items():
    if name == "__metadata__":
      continue
    offsets = info.get("data_offsets") if isinstance(info, dict) else None
    if not (isinstance(offsets, list) and len(offsets) == 2 and
            all(isinstance(o, int) and not isinstance(o, bool) for o in offsets) and
            0 <= offsets[0] <= offsets[1]):
      raise CheckpointError(f"safetensors file {path}: tensor {name!r} has invalid data_offsets "
                            f"{offsets!r}")
    begin, end = offsets
    if data_start + end > size:
      raise CheckpointError(f"safetensors file {path} is truncated: tensor {name!r} ends at "
                            f"byte {data_start + end}, the file has {size}")
  return header, data_start


def _safetensors_dtype(code: str, name: str, path: str) -> np.dtype:
  if code == "BF16":
    return msgpack_codec.dtype_from_name("bfloat16")
  if code not in _SAFETENSORS_DTYPES:
    raise CheckpointError(f"{path}: tensor {name!r} has unsupported dtype {code}")
  return np.dtype(_SAFETENSORS_DTYPES[code])


def _safetensors_tensors(path: str) -> Dict[str, Tuple[Tuple[int, ...], np.dtype, Callable]]:
  header, data_start = _safetensors_header(path)
  out = {}
  for name, info in header.items():
    if name == "__metadata__":
      continue
    dtype = _safetensors_dtype(info.get("dtype"), name, path)
    shape = confine.check_shape(info.get("shape"), dtype.itemsize, f"{path}: tensor {name!r}")
    begin, end = info["data_offsets"]
    expected = math.prod(shape) * dtype.itemsize  # Python ints: no int64 overflow
    if end - begin != expected:
      raise CheckpointError(f"{path}: tensor {name!r} holds {end - begin} bytes, shape {shape} "
                            f"{dtype.name} needs {expected}")

    def read(begin=begin, shape=shape, dtype=dtype, name=name, expected=expected):
      with open(path, "rb") as f:
        f.seek(data_start + begin)
        data = f.read(expected)
      if len(data) != expected:
        raise CheckpointError(f"{path}: tensor {name!r} is truncated")
      return np.frombuffer(data, dtype=dtype).reshape(shape)

    out[name] = (shape, dtype, read)
  return out


def _torch_tensors(path: str) -> Dict[str, Tuple[Tuple[int, ...], np.dtype, Callable]]:
  try:
    import torch  # optional extra (tests only), seconds to import: only for .bin files
  except ImportError:
    raise CheckpointError(f"{path} is a PyTorch file; install torch to read it, or convert "
                          "it to model.safetensors") from None
  try:
    try:
      # mmap: tensors stay on disk until read (needs the zip format torch has saved since 1.6).
      state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError:
      state = torch.load(path, map_location="cpu", weights_only=True)
  except Exception as error:
    raise CheckpointError(f"cannot read PyTorch checkpoint {path}: {error}") from error
  out = {}
  for name, tensor in state.items():
    if tensor.dtype == torch.bfloat16:
      dtype = msgpack_codec.dtype_from_name("bfloat16")
      read = lambda t=tensor: t.contiguous().view(torch.int16).numpy().view(
          msgpack_codec.dtype_from_name("bfloat16"))
    else:
      dtype = np.dtype(str(tensor.dtype).replace("torch.", ""))
      read = lambda t=tensor: t.contiguous().numpy()
    out[name] = (tuple(tensor.shape), dtype, read)
  return out


def raw_tensors(path: str, root: Optional[str] = None
                ) -> Dict[str, Tuple[Tuple[int, ...], np.dtype, Callable]]:
  """{HF name: (shape, dtype, reader)} over one file or a sharded index.

  Every file read (the index, its shards, the weight file) must lie inside `root` (default: the
  directory `path`; see confine.hf_root) after resolving symlinks; a shard named by an absolute
  or `..` path is refused.
  """
  root = path if root is None else root
  for index_name, reader in ((SAFETENSORS_INDEX, _safetensors_tensors),
                             (TORCH_BIN_INDEX, _torch_tensors)):
    index = os.path.join(path, index_name)
    if os.path.isfile(index):
      confine.resolve_inside(root, index, "HF shard index")
      try:
        with open(index) as f:
          weight_map = json.load(f)["weight_map"]
      except (OSError, ValueError, KeyError) as error:
        raise CheckpointError(f"cannot read shard index {index}: {error}") from error
      if not isinstance(weight_map, dict) or not all(isinstance(v, str)
                                                     for v in weight_map.values()):
        raise CheckpointError(f"shard index {index}: 'weight_map' is not a map of tensor names "
                              "to file names")
      out = {}
      for shard in sorted(set(weight_map.values())):
        shard_path = confine.join_inside(root, shard, f"shard {shard!r} listed in {index}",
                                         base=path)
        if not os.path.isfile(shard_path):
          raise CheckpointError(f"shard {shard_path} listed in {index} is missing")
        out.update(reader(shard_path))
      return out
  for name, reader in ((SAFETENSORS, _safetensors_tensors), (TORCH_BIN, _torch_tensors)):
    if os.path.isfile(os.path.join(path, name)):
      return reader(confine.resolve_inside(root, os.path.join(path, name), "HF weight file"))
  raise CheckpointError(f"{path} holds no {SAFETENSORS}, {SAFETENSORS_INDEX} or {TORCH_BIN}")
