"""T5Config: defaults, the head-count rule (from grouping.py), every refusal naming its field."""

import numpy as np
import pytest

from gqa_t5.model import T5Config
from gqa_t5.model import grouping


def test_kv_heads_default_to_num_heads():
  config = T5Config(vocab_size=32, num_heads=8)
  assert config.self_attention_kv_heads == 8
  assert config.cross_attention_kv_heads == 8


def test_cross_kv_heads_follow_self_kv_heads_unless_set():
  assert T5Config(vocab_size=32, num_heads=8, num_kv_heads=2).cross_attention_kv_heads == 2
  config = T5Config(vocab_size=32, num_heads=8, num_kv_heads=2, num_cross_kv_heads=4)
  assert (config.self_attention_kv_heads, config.cross_attention_kv_heads) == (2, 4)


@pytest.mark.parametrize("field,value,message", [
    ("num_kv_heads", 3, "num_kv_heads=3 does not divide num_heads=8"),
    ("num_cross_kv_heads", 5, "num_cross_kv_heads=5 does not divide num_heads=8"),
    ("num_kv_heads", 0, "num_kv_heads must be a positive integer, got 0"),
    ("num_heads", 0, "num_heads must be a positive integer, got 0"),
    ("head_dim", -4, "head_dim must be a positive integer, got -4"),
    ("emb_dim", 12.5, "emb_dim must be a positive integer, got 12.5"),
    ("num_decoder_layers", -1, "num_decoder_layers must be a positive integer, got -1"),
    ("num_decoder_layers", 0, "num_decoder_layers must be a positive integer, got 0"),
    ("num_encoder_layers", 0, "num_encoder_layers must be a positive integer, got 0"),
    ("vocab_size", np.float32(32), "vocab_size must be a positive integer, got"),
    ("num_kv_heads", True, "num_kv_heads must be a positive integer, got True"),
    ("dropout_rate", 1.5, "dropout_rate must be in [0, 1)"),
    ("dropout_rate", "0.1", "dropout_rate must be in [0, 1), got '0.1'"),
    ("mlp_activations", ("gelu", "bogus"), "unknown activation 'bogus'"),
    ("mlp_activations", "gelu", "mlp_activations must be a sequence of activation names, got the "
                                "string 'gelu'; write ('gelu',)"),
    ("mlp_activations", None, "mlp_activations must be a sequence of activation names, got None"),
    ("mlp_activations", (), "mlp_activations must name at least one activation"),
    ("remat_policy", "some", "remat_policy must be 'none', 'full' or 'minimal', got 'some'"),
])
def test_invalid_configs_name_field_and_value(field, value, message):
  fields = {"vocab_size": 32, "num_heads": 8, field: value}
  with pytest.raises(ValueError) as error:
    T5Config(**fields)
  assert f"T5Config.{field}" in str(error.value)
  assert message in str(error.value)


def test_numpy_integer_dimensions_become_ints():
  config = T5Config(vocab_size=np.int64(32), emb_dim=np.int32(16), num_heads=np.int64(8),
                    num_kv_heads=np.int16(2), num_decoder_layers=np.uint8(3))
  plain = T5Config(vocab_size=32, emb_dim=16, num_heads=8, num_kv_heads=2, num_decoder_layers=3)
  assert config == plain and hash(config) == hash(plain)
  assert all(type(getattr(config, f)) is int
             for f in ("vocab_size", "emb_dim", "num_heads", "num_kv_heads", "num_decoder_layers"))
  assert type(config.replace(head_dim=np.int64(4)).head_dim) is int


def test_non_divisor_error_lists_valid_choices_from_grouping():
  with pytest.raises(ValueError, match=r"use one of \[1, 2, 3, 6\]"):
    T5Config(vocab_size=32, num_heads=6, num_kv_heads=4)
  assert grouping.valid_kv_heads(6) == [1, 2, 3, 6]
  for k in grouping.valid_kv_heads(12):  # every choice grouping allows, the config accepts
    assert T5Config(vocab_size=32, num_heads=12, num_kv_heads=k).self_attention_kv_heads == k


def test_grouping_adjacent_heads_share_a_kv_head():
  assert [grouping.kv_head_of(n, 8, 2) for n in range(8)] == [0, 0, 0, 0, 1, 1, 1, 1]
  assert [grouping.kv_head_of(n, 8, 8) for n in range(8)] == list(range(8))
  assert list(grouping.query_heads_of(1, 8, 4)) == [2, 3]
  with pytest.raises(ValueError, match="does not divide"):
    grouping.group_size(8, 3)
