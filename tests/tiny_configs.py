"""The test suite's one family of model sizes: `gqa_t5.model.sizes`'s `tiny`, shrunk per use.

`sizes.t5_1_1('tiny')` is the smallest named size (D 64, N 8, H 16, mlp 128, 2 layers per
stack, T5's vocabulary, bfloat16). The tests start from it and override what their checks need,
as a named variant, so every test model is `tiny` plus a documented difference: float32
activations always (a float32 tolerance means the same on every backend, see conftest.py), and
per variant smaller shapes (CPU time), a vocabulary a test task or checkpoint fixes, or a head
dim unequal to D / N (a transposed kernel then has another shape). Shapes stay as the tests were
written against them: goldens (tests/goldens) and hard-coded shapes depend on them.
"""

from typing import Any, Dict, Optional

import jax.numpy as jnp

from gqa_t5.model import sizes
from gqa_t5.model.config import T5Config

# variant -> fields overriding `tiny` (dropout 0.0 unless the tests ran with T5Config's 0.1).
VARIANTS: Dict[str, Dict[str, Any]] = {
    # The network, decoding, model and prefill tests (tests/goldens' parameter trees).
    "network": dict(vocab_size=67, emb_dim=24, num_heads=4, head_dim=8, mlp_dim=40,
                    dropout_rate=0.0),
    # The trainer tests: trainer_fixtures' byte-level toy task (seqio.ByteVocabulary's 259 ids,
    # padded to a multiple of 64).
    "trainer": dict(vocab_size=320, emb_dim=32, num_heads=4, head_dim=8, mlp_dim=64,
                    dropout_rate=0.0),
    # The checkpoint format, conversion and reliability tests' synthetic trees.
    "checkpoint": dict(vocab_size=50, emb_dim=16, num_heads=4, head_dim=8, mlp_dim=24,
                       dropout_rate=0.0),
    # The tree and shape tests: H * N != D and unequal stacks (3 decoder layers).
    "tree": dict(vocab_size=40, emb_dim=16, num_heads=4, head_dim=6, mlp_dim=20,
                 num_decoder_layers=3, dropout_rate=0.0),
    # The converter's end-to-end tests: H * N != D, HF's side built at the same sizes.
    "convert": dict(vocab_size=53, emb_dim=16, num_heads=4, head_dim=6, mlp_dim=24,
                    dropout_rate=0.0),
    # The partitioning tests: 8 query heads (K = 8, 4, 2, 1 over a 4-way model axis), 1 layer.
    "partitioning": dict(vocab_size=320, emb_dim=32, num_heads=8, head_dim=4, mlp_dim=64,
                         num_encoder_layers=1, num_decoder_layers=1),
    # The t5x-compatibility tests.
    "t5x": dict(vocab_size=64, emb_dim=16, num_heads=4, head_dim=4, mlp_dim=32),
    # The checkpoint t5x wrote (tests/fixtures/t5x_tiny): its sizes are on disk.
    "t5x_fixture": dict(vocab_size=1152, emb_dim=128, num_heads=8, head_dim=32, mlp_dim=256,
                        num_encoder_layers=3, num_decoder_layers=2),
}


def tiny_config(variant: str, num_kv_heads: Optional[int] = None, **overrides) -> T5Config:
  """`tiny` with `variant`'s fields, float32 activations, K = `num_kv_heads` (None: multi-head),
  then `overrides` (e.g. `num_cross_kv_heads=1`, `scan_layers=True`)."""
  if variant not in VARIANTS:
    raise ValueError(f"unknown tiny-config variant {variant!r}; known: {', '.join(VARIANTS)}")
  fields: Dict[str, Any] = dict(dtype=jnp.float32, num_kv_heads=num_kv_heads)
  fields.update(VARIANTS[variant])
  fields.update(overrides)
  return sizes.t5_1_1("tiny", **fields)
