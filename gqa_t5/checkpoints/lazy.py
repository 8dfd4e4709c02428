"""Tensors that are read from disk only when asked for, so a checkpoint can be streamed.

A checkpoint source maps each '/'-joined parameter name to a `LazyTensor`: its shape and dtype
are known up front (from metadata), its values are read by `read()`. The converter and the
writers touch one tensor at a time, which keeps peak memory near the size of the largest tensor
whatever the model size.
"""

from __future__ import annotations

from typing import Callable, Tuple

import numpy as np

from gqa_t5.checkpoints.errors import CheckpointError
from gqa_t5.checkpoints.msgpack_codec import dtype_from_name

_BFLOAT16 = dtype_from_name("bfloat16")
_FINITE_BLOCK = 1 << 24  # elements checked at a time: the mask costs 16 MiB, not a tensor's size


class LazyTensor:
  """A named tensor of known shape and dtype whose values come from `reader()` on demand."""

  def __init__(self, name: str, shape: Tuple[int, ...], dtype, reader: Callable[[], np.ndarray]):
    self.name = name
    self.shape = tuple(int(d) for d in shape)
    self.dtype = np.dtype(dtype)
    self._reader = reader

  @property
  def nbytes(self) -> int:
    return int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize

  @property
  def size(self) -> int:
    return int(np.prod(self.shape, dtype=np.int64))

  @property
  def ndim(self) -> int:
    return len(self.shape)

  def read(self) -> np.ndarray:
    """Reads the values; raises CheckpointError (naming the tensor) on a shape/dtype mismatch."""
    value = np.asarray(self._reader())
    if value.shape != self.shape:
      raise CheckpointError(f"tensor {self.name!r}: read shape {value.shape}, "
                            f"metadata says {self.shape}")
    if value.dtype != self.dtype:
      value = value.astype(self.dtype)
    return value

  def __deepcopy__(self, memo):
    # Orbax deep-copies host values before an async save; a lazy tensor is immutable.
    return self

  def __repr__(self) -> str:
    return f"LazyTensor({self.name!r}, shape={self.shape}, dtype={self.dtype.name})"


def from_array(name: str, value: np.ndarray) -> LazyTensor:
  """Wraps an in-memory array so it can go wherever a lazy tensor goes."""
  value = np.asarray(value)
  return LazyTensor(name, value.shape, value.dtype, lambda: value)


def count_nonfinite(value: np.ndarray) -> int:
  """How many NaN/inf values a tensor holds (0 for integer tensors), in bounded memory."""
  value = np.asarray(value)
  if value.dtype.kind not in "fc" and value.dtype != _BFLOAT16:
    return 0
  flat = value.reshape(-1)
  bad = 0
  for start in range(0, flat.size, _FINITE_BLOCK):
    finite = np.isfinite(flat[start:start + _FINITE_BLOCK])
    bad += finite.size - int(np.count_nonzero(finite))
  return bad


def finite_checked(tensor: LazyTensor, source: str, hint: str = "") -> LazyTensor:
  """`tensor`, whose read raises CheckpointError naming it and the count of NaN/inf values."""

  def read():
    value = tensor.read()
    bad = count_nonfinite(value)
    if bad:
      raise CheckpointError(f"tensor {tensor.name!r} of {source} has {bad} non-finite value(s) "
                            f"(NaN or inf) out of {value.size}" + (f"; {hint}" if hint else ""))
    return value

  return LazyTensor(tensor.name, tensor.shape, tensor.dtype, read)
