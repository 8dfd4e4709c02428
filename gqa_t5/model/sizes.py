"""The named model sizes, in one table: T5.1.1's (T5X's dimensions) and a CPU-sized `tiny`.

gin/t5_1_1/*.gin, the benchmarks and the reproduction presets all describe a size by one of
these names (a test checks the gin files against this table); any other size is a `T5Config`.
"""

from __future__ import annotations

from typing import Dict

from gqa_t5.model.config import T5Config

# T5.1.1's vocabulary: 32,100 SentencePiece ids rounded up to a multiple of 128.
T5_VOCAB_SIZE = 32128

# name: (emb_dim D, num_heads N, head_dim H, mlp_dim, layers per stack)
_DIMS: Dict[str, tuple] = {
    "tiny": (64, 8, 16, 128, 2),
    "small": (512, 6, 64, 1024, 8),
    "base": (768, 12, 64, 2048, 12),
    "large": (1024, 16, 64, 2816, 24),
    "xl": (2048, 32, 64, 5120, 24),
    "xxl": (4096, 64, 64, 10240, 24),
}
NAMES = tuple(_DIMS)


def t5_1_1(name: str, **overrides) -> T5Config:
  """The `T5Config` of size `name` (bfloat16 activations, T5.1.1's vocabulary) with
  `overrides` applied, e.g. `t5_1_1('xxl', num_kv_heads=8)` for GQA-8-XXL."""
  if name not in _DIMS:
    raise ValueError(f"unknown model size {name!r}; known: {', '.join(NAMES)}")
  emb_dim, num_heads, head_dim, mlp_dim, layers = _DIMS[name]
  fields = dict(vocab_size=T5_VOCAB_SIZE, dtype="bfloat16", emb_dim=emb_dim,
                num_heads=num_heads, head_dim=head_dim, mlp_dim=mlp_dim,
                num_encoder_layers=layers, num_decoder_layers=layers)
  fields.update(overrides)
  return T5Config(**fields)
