"""Flax's msgpack encoding of array trees, without importing flax.

Arrays are msgpack ext type 1 holding msgpack((shape, dtype name, C-order bytes)); numpy
scalars are ext type 3 (same payload); Python complex numbers ext type 2. Arrays over 1 GiB
are split by flax into a dict marked '__msgpack_chunked_array__'; `decode` joins them back.
"""

from __future__ import annotations

from typing import Any

import ml_dtypes
import msgpack
import numpy as np

_NDARRAY, _COMPLEX, _NPSCALAR = 1, 2, 3
_CHUNKED = "__msgpack_chunked_array__"


def dtype_from_name(name) -> np.dtype:
  if isinstance(name, bytes):
    name = name.decode()
  if name == "bfloat16":
    return np.dtype(ml_dtypes.bfloat16)
  return np.dtype(name)


def _array_from_payload(data: bytes) -> np.ndarray:
  shape, dtype_name, buffer = msgpack.unpackb(data, raw=True)
  dtype = dtype_from_name(dtype_name)
  count = int(np.prod(shape, dtype=np.int64))
  if len(buffer) != count * dtype.itemsize:
    raise ValueError(f"inline array of shape {tuple(shape)} {dtype.name} holds {len(buffer)} "
                     f"bytes, expected {count * dtype.itemsize}")
  # copy(): frombuffer gives a read-only view of the msgpack buffer.
  return np.frombuffer(buffer, dtype=dtype).reshape(shape).copy()


def _ext_hook(code: int, data: bytes):
  if code == _NDARRAY:
    return _array_from_payload(data)
  if code == _NPSCALAR:
    return _array_from_payload(data)[()]
  if code == _COMPLEX:
    real, imag = msgpack.unpackb(data)
    return complex(real, imag)
  return msgpack.ExtType(code, data)


def _join_chunked(node):
  if isinstance(node, dict):
    if node.get(_CHUNKED):
      shape = tuple(node["shape"][str(i)] for i in range(len(node["shape"])))
      chunks = [node["chunks"][str(i)] for i in range(len(node["chunks"]))]
      return np.concatenate(chunks).reshape(shape)
    return {key: _join_chunked(value) for key, value in node.items()}
  return node


def decode(data: bytes) -> Any:
  """msgpack bytes (as written by flax.serialization) -> tree of numpy arrays."""
  tree = msgpack.unpackb(data, ext_hook=_ext_hook, raw=False, strict_map_key=False)
  return _join_chunked(tree)


def _payload(value: np.ndarray) -> bytes:
  # tobytes('C') copes with any layout; np.ascontiguousarray would turn 0-d into 1-d.
  return msgpack.packb((list(value.shape), value.dtype.name, value.tobytes("C")),
                       use_bin_type=True)


def _default(value):
  if isinstance(value, np.ndarray):
    return msgpack.ExtType(_NDARRAY, _payload(value))
  if isinstance(value, np.generic):
    return msgpack.ExtType(_NPSCALAR, _payload(np.asarray(value)))
  if isinstance(value, complex):
    return msgpack.ExtType(_COMPLEX, msgpack.packb((value.real, value.imag)))
  raise TypeError(f"cannot msgpack-encode a {type(value).__name__}")


def encode(tree: Any) -> bytes:
  """Tree of dicts / numpy arrays / Python scalars -> msgpack bytes flax can read."""
  return msgpack.packb(tree, default=_default, use_bin_type=True)
