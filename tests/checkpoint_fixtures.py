"""Shared by the checkpoint tests: a small T5 config and exact tree comparison."""

import numpy as np

from gqa_t5.checkpoints import tree as tree_lib
from gqa_t5.model.config import T5Config


def small_config(**overrides):
  fields = dict(vocab_size=50, emb_dim=16, num_heads=4, head_dim=8, mlp_dim=24,
                num_encoder_layers=2, num_decoder_layers=2, dropout_rate=0.0)
  fields.update(overrides)
  return T5Config(**fields)


def assert_trees_equal(a, b):
  """Same leaf names, dtypes and values."""
  fa, fb = tree_lib.flatten(a), tree_lib.flatten(b)
  assert sorted(fa) == sorted(fb)
  for name in fa:
    assert np.asarray(fb[name]).dtype == np.asarray(fa[name]).dtype, name
    assert np.array_equal(fa[name], fb[name]), name
