"""Synthetic T5.1.1 parameter trees (numpy only) for tests and the conversion benchmark.

`lazy_params` generates each tensor only when it is read, so a synthetic XXL checkpoint can be
written with about one tensor in memory.
"""

from __future__ import annotations

import zlib
from typing import Dict

import numpy as np

from gqa_t5.checkpoints import tree as tree_lib
from gqa_t5.checkpoints.atomic import atomic_directory
from gqa_t5.checkpoints.lazy import LazyTensor
from gqa_t5.checkpoints.t5x_legacy import T5XWriter
from gqa_t5.model.config import T5Config


def _values(name: str, shape, dtype, seed: int) -> np.ndarray:
  rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
  if name.endswith("/scale"):
    values = 1.0 + 0.1 * rng.standard_normal(shape, dtype=np.float32)
  else:
    fan_in = shape[0] if len(shape) > 1 else 1
    scale = 1.0 if name == "token_embedder/embedding" else fan_in ** -0.5
    values = rng.standard_normal(shape, dtype=np.float32)
    values *= scale
  return values.astype(dtype)


def lazy_params(config: T5Config, seed: int = 0, dtype=np.float32) -> Dict[str, LazyTensor]:
  """{name: LazyTensor} of random parameters with the shapes of `config`."""
  dtype = np.dtype(dtype)
  return {name: LazyTensor(name, shape, dtype,
                           lambda name=name, shape=shape: _values(name, shape, dtype, seed))
          for name, shape in tree_lib.expected_shapes(config).items()}


def random_params(config: T5Config, seed: int = 0, dtype=np.float32) -> Dict:
  """A nested parameter tree of random numpy arrays with the shapes of `config`."""
  return tree_lib.unflatten({name: t.read() for name, t in lazy_params(config, seed, dtype).items()})


def write_t5x(path: str, config: T5Config, seed: int = 0, dtype=np.float32, step: int = 0,
              overwrite: bool = False, compression: str = "gzip") -> None:
  """Writes a synthetic T5X legacy checkpoint, generating one tensor at a time."""
  with atomic_directory(path, overwrite=overwrite) as tmp:
    writer = T5XWriter(tmp, compression=compression)
    for name, tensor in lazy_params(config, seed, dtype).items():
      writer.write(name, tensor.read())
    writer.finalize(step)
