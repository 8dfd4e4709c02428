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
    ("num_decoder_layers", -1, "num_decoder_layers must be a non-negative integer"),
    ("dropout_rate", 1.5, "dropout_rate must be in [0, 1)"),
    ("mlp_activations", ("gelu", "bogus"), "unknown activation 'bogus'"),
])
def test_invalid_configs_name_field_and_value(field, value, message):
  fields = {"vocab_size": 32, "num_heads": 8, field: value}
  with pytest.raises(ValueError) as error:
    T5Config(**fields)
  assert message in str(error.value)


def test_non_divisor_error_lists_valid_choices():
  with pytest.raises(ValueError, match=r"use one of \[1, 2, 3, 6\]"):
    T5Config(vocab_size=32, num_heads=6, num_kv_heads=4)


def test_grouping_adjacent_heads_share_a_kv_head():
  assert [grouping.kv_head_of(n, 8, 2) for n in range(8)] == [0, 0, 0, 0, 1, 1, 1, 1]
  assert [grouping.kv_head_of(n, 8, 8) for n in range(8)] == list(range(8))
  assert list(grouping.query_heads_of(1, 8, 4)) == [2, 3]
  with pytest.raises(ValueError, match="does not divide"):
    grouping.group_size(8, 3)
