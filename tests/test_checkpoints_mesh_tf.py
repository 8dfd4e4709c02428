"""Mesh TensorFlow checkpoints: a checkpoint written here with TensorFlow under the public names."""

import os

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")

from gqa_t5.checkpoints import mesh_tf, synthetic  # noqa: E402
from gqa_t5.checkpoints import tree as tree_lib  # noqa: E402
from gqa_t5.checkpoints.detect import detect_format  # noqa: E402
from gqa_t5.checkpoints.errors import CheckpointError  # noqa: E402
from tiny_configs import tiny_config  # noqa: E402

CONFIG = tiny_config("checkpoint", num_decoder_layers=3)


def _public_names(config):
  """{Mesh TF variable name: T5X name}, written out as the public T5.1.1 checkpoints name them."""
  names = {"shared/embedding": "token_embedder/embedding",
           "encoder/final_layer_norm/scale": "encoder/encoder_norm/scale",
           "decoder/final_layer_norm/scale": "decoder/decoder_norm/scale",
           "decoder/logits/kernel": "decoder/logits_dense/kernel",
           "encoder/block_000/layer_000/SelfAttention/relative_attention_bias":
               "encoder/relpos_bias/rel_embedding",
           "decoder/block_000/layer_000/SelfAttention/relative_attention_bias":
               "decoder/relpos_bias/rel_embedding"}
  for i in range(config.num_encoder_layers):
    block = f"encoder/block_{i:03d}"
    for m, ours in zip("qkvo", ("query", "key", "value", "out")):
      names[f"{block}/layer_000/SelfAttention/{m}"] = f"encoder/layers_{i}/attention/{ours}/kernel"
    names[f"{block}/layer_000/layer_norm/scale"] = f"encoder/layers_{i}/pre_attention_layer_norm/scale"
    for w in ("wi_0", "wi_1", "wo"):
      names[f"{block}/layer_001/DenseReluDense/{w}/kernel"] = f"encoder/layers_{i}/mlp/{w}/kernel"
    names[f"{block}/layer_001/layer_norm/scale"] = f"encoder/layers_{i}/pre_mlp_layer_norm/scale"
  for i in range(config.num_decoder_layers):
    block = f"decoder/block_{i:03d}"
    for m, ours in zip("qkvo", ("query", "key", "value", "out")):
      names[f"{block}/layer_000/SelfAttention/{m}"] = f"decoder/layers_{i}/self_attention/{ours}/kernel"
      names[f"{block}/layer_001/EncDecAttention/{m}"] = (
          f"decoder/layers_{i}/encoder_decoder_attention/{ours}/kernel")
    names[f"{block}/layer_000/layer_norm/scale"] = (
        f"decoder/layers_{i}/pre_self_attention_layer_norm/scale")
    names[f"{block}/layer_001/layer_norm/scale"] = (
        f"decoder/layers_{i}/pre_cross_attention_layer_norm/scale")
    for w in ("wi_0", "wi_1", "wo"):
      names[f"{block}/layer_002/DenseReluDense/{w}/kernel"] = f"decoder/layers_{i}/mlp/{w}/kernel"
    names[f"{block}/layer_002/layer_norm/scale"] = f"decoder/layers_{i}/pre_mlp_layer_norm/scale"
  return names


def _write_tf_checkpoint(directory, variables, step=1000):
  """A TF1 checkpoint (what Mesh TF writes) holding exactly `variables` plus global_step."""
  graph = tf.Graph()
  with graph.as_default():
    created = [tf.compat.v1.get_variable(name, initializer=tf.constant(value))
               for name, value in variables.items()]
    created.append(tf.compat.v1.get_variable("global_step", initializer=tf.constant(step, tf.int64)))
    saver = tf.compat.v1.train.Saver(created)
    with tf.compat.v1.Session(graph=graph) as session:
      session.run(tf.compat.v1.global_variables_initializer())
      return saver.save(session, os.path.join(directory, "model.ckpt"), global_step=step)


@pytest.fixture(scope="module")
def params():
  return tree_lib.flatten(synthetic.random_params(CONFIG, seed=3))


def _variables(params, with_slots=True):
  names = _public_names(CONFIG)
  variables = {mtf: params[ours] for mtf, ours in names.items()}
  if with_slots:
    # Adafactor's factored second moments, as the released checkpoints carry them.
    kernel = "decoder/block_001/layer_002/DenseReluDense/wo/kernel"
    variables[kernel + "_slot_vr"] = np.ones((24,), np.float32)
    variables[kernel + "_slot_vc"] = np.ones((16,), np.float32)
  return variables


def test_reads_public_variable_names(tmp_path, params):
  prefix = _write_tf_checkpoint(str(tmp_path), _variables(params))
  assert detect_format(str(tmp_path)) == "mesh-tf"
  for path in (str(tmp_path), prefix):
    source = mesh_tf.open_mesh_tf(path)
    assert source.step == 1000
    config = source.config
    assert (config.num_encoder_layers, config.num_decoder_layers, config.num_heads,
            config.head_dim, config.mlp_dim, config.vocab_size) == (2, 3, 4, 8, 24, 50)
    assert config.mlp_activations == ("gelu", "linear") and not config.logits_via_embedding
    assert sorted(source.tensors) == sorted(params)
    for name, tensor in source.tensors.items():
      assert np.array_equal(tensor.read(), params[name]), name


def test_bfloat16_variables(tmp_path, params):
  variables = {k: tf.constant(v, tf.bfloat16).numpy() for k, v in _variables(params, False).items()}
  _write_tf_checkpoint(str(tmp_path), variables)
  source = mesh_tf.open_mesh_tf(str(tmp_path))
  value = source.tensors["decoder/layers_2/self_attention/key/kernel"].read()
  assert value.dtype.name == "bfloat16"
  assert np.allclose(value.astype(np.float32), params["decoder/layers_2/self_attention/key/kernel"],
                     atol=2e-2)


def test_unknown_missing_and_misshaped_variables(tmp_path, params):
  variables = _variables(params)
  variables["decoder/block_000/layer_002/DenseReluDense/bogus/kernel"] = np.ones((2,), np.float32)
  _write_tf_checkpoint(str(tmp_path / "extra"), variables)
  with pytest.raises(CheckpointError, match="DenseReluDense/bogus/kernel' is not part of a T5"):
    mesh_tf.open_mesh_tf(str(tmp_path / "extra"))
  variables = _variables(params)
  del variables["encoder/block_001/layer_001/layer_norm/scale"]
  variables["decoder/block_002/layer_001/EncDecAttention/k"] = np.ones((16, 12), np.float32)
  _write_tf_checkpoint(str(tmp_path / "bad"), variables)
  with pytest.raises(CheckpointError) as info:
    mesh_tf.open_mesh_tf(str(tmp_path / "bad"))
  message = str(info.value)
  assert "missing tensor 'encoder/layers_1/pre_mlp_layer_norm/scale'" in message
  assert ("'decoder/layers_2/encoder_decoder_attention/key/kernel' has shape (16, 12), "
          "expected (16, 32)") in message
  with pytest.raises(CheckpointError, match="not a TensorFlow checkpoint"):
    mesh_tf.open_mesh_tf(str(tmp_path / "nowhere"))
