"""Tensors that are read from disk only when asked for, so a checkpoint can be streamed.

A checkpoint source maps each '/'-joined parameter name to a `LazyTensor`: its shape and dtype
are known up front (from metadata), its values are read by `read()`. The converter and the
writers touch one tensor at a time, which keeps peak memory near the size of the largest tensor
whatever the model size.
"""

from __future__ import annotations

from typing import Callable, Tuple

import numpy as np


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
    from gqa_t5.checkpoints.errors import CheckpointError  # local: keeps this module standalone
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


def derived(name: str, shape, dtype, compute: Callable[[], np.ndarray]) -> LazyTensor:
  """A tensor computed from others (e.g. pooled key heads) when first read."""
  return LazyTensor(name, shape, dtype, compute)
