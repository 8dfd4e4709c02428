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

# The public T5.1.1 sizes (vocab 32128, gated GELU, untied logits).
T511_SIZES = {
    "small": dict(emb_dim=512, num_heads=6, head_dim=64, mlp_dim=1024, num_encoder_layers=8,
                  num_decoder_layers=8),
    "base": dict(emb_dim=768, num_heads=12, head_dim=64, mlp_dim=2048, num_encoder_layers=12,
                 num_decoder_layers=12),
    "large": dict(emb_dim=1024, num_heads=16, head_dim=64, mlp_dim=2816, num_encoder_layers=24,
                  num_decoder_layers=24),
    "xl": dict(emb_dim=2048, num_heads=32, head_dim=64, mlp_dim=5120, num_encoder_layers=24,
               num_decoder_layers=24),
    "xxl": dict(emb_dim=4096, num_heads=64, head_dim=64, mlp_dim=10240, num_encoder_layers=24,
                num_decoder_layers=24),
}


def t511_config(size: str, **overrides) -> T5Config:
  fields = dict(vocab_size=32128, dropout_rate=0.0, mlp_activations=("gelu", "linear"))
  fields.update(T511_SIZES[size])
  fields.update(overrides)
  return T5Config(**fields)


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
