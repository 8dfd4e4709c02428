"""Parameter-tree helpers: flatten/unflatten, expected shapes, validation, config inference."""

import numpy as np
import pytest

from gqa_t5.checkpoints import tree
from gqa_t5.checkpoints.errors import CheckpointError
from tiny_configs import tiny_config


def test_flatten_unflatten_round_trip():
  nested = {"a": {"b": np.ones(2), "c": {"d": np.zeros(3)}}, "e": np.arange(4)}
  flat = tree.flatten(nested)
  assert sorted(flat) == ["a/b", "a/c/d", "e"]
  back = tree.unflatten(flat)
  assert np.array_equal(back["a"]["c"]["d"], nested["a"]["c"]["d"])
  assert set(back) == {"a", "e"}


def test_expected_shapes_of_gqa_config():
  shapes = tree.expected_shapes(tiny_config("tree", num_kv_heads=2, num_cross_kv_heads=1))
  assert shapes["decoder/layers_2/self_attention/query/kernel"] == (16, 24)
  assert shapes["decoder/layers_2/self_attention/key/kernel"] == (16, 12)
  assert shapes["decoder/layers_0/encoder_decoder_attention/value/kernel"] == (16, 6)
  assert shapes["decoder/layers_0/encoder_decoder_attention/out/kernel"] == (24, 16)
  # Encoder attention is always multi-head.
  assert shapes["encoder/layers_1/attention/key/kernel"] == (16, 24)
  assert shapes["decoder/relpos_bias/rel_embedding"] == (4, 32)
  assert shapes["decoder/logits_dense/kernel"] == (16, 40)
  assert "encoder/layers_2/attention/key/kernel" not in shapes
  assert len([n for n in shapes if n.startswith("decoder/layers_0/")]) == 14


def test_expected_shapes_single_activation_and_tied_logits():
  shapes = tree.expected_shapes(tiny_config("tree", mlp_activations=("relu",), logits_via_embedding=True))
  assert shapes["encoder/layers_0/mlp/wi/kernel"] == (16, 20)
  assert "encoder/layers_0/mlp/wi_0/kernel" not in shapes
  assert "decoder/logits_dense/kernel" not in shapes


def test_validate_names_missing_extra_and_wrong_shapes():
  config = tiny_config("tree")
  shapes = dict(tree.expected_shapes(config))
  del shapes["decoder/layers_1/mlp/wo/kernel"]
  shapes["decoder/layers_0/self_attention/key/kernel"] = (16, 12)
  shapes["decoder/bogus/kernel"] = (3, 3)
  with pytest.raises(CheckpointError) as info:
    tree.validate_shapes(shapes, config, source="test ckpt")
  message = str(info.value)
  assert "test ckpt" in message
  assert "missing tensor 'decoder/layers_1/mlp/wo/kernel' (expected shape (20, 16))" in message
  assert "unexpected tensor 'decoder/bogus/kernel'" in message
  assert ("'decoder/layers_0/self_attention/key/kernel' has shape (16, 12), expected (16, 24)"
          in message)


@pytest.mark.parametrize("kv,cross", [(None, None), (2, None), (1, 2), (4, 1)])
def test_infer_config_recovers_the_config(kv, cross):
  config = tiny_config("tree", num_kv_heads=kv, num_cross_kv_heads=cross)
  inferred = tree.infer_config(tree.expected_shapes(config))
  for field in ("vocab_size", "emb_dim", "num_heads", "head_dim", "mlp_dim",
                "num_encoder_layers", "num_decoder_layers", "mlp_activations",
                "logits_via_embedding"):
    assert getattr(inferred, field) == getattr(config, field), field
  assert inferred.self_attention_kv_heads == config.self_attention_kv_heads
  assert inferred.cross_attention_kv_heads == config.cross_attention_kv_heads


def test_infer_config_rejects_scanned_and_incomplete_trees():
  with pytest.raises(CheckpointError, match="scanned"):
    tree.infer_config({"encoder/layers/attention/key/kernel": (2, 16, 24)})
  shapes = dict(tree.expected_shapes(tiny_config("tree")))
  del shapes["encoder/relpos_bias/rel_embedding"]
  with pytest.raises(CheckpointError, match="encoder/relpos_bias/rel_embedding"):
    tree.infer_config(shapes)
