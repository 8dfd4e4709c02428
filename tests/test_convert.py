"""The converter end to end: function-level properties through the network, the CLI, bad input."""

import json
import os

import jax.numpy as jnp
import numpy as np
import pytest

import fixture_paths

from gqa_t5.checkpoints import orbax_format, synthetic, t5x_legacy
from gqa_t5.checkpoints import tree as tree_lib
from gqa_t5.convert import cli, converter, pooling
from tiny_configs import VARIANTS, tiny_config

N = VARIANTS["convert"]["num_heads"]
VOCAB = VARIANTS["convert"]["vocab_size"]


def _batch(seed=0):
  rng = np.random.RandomState(seed)
  inputs = rng.randint(2, VOCAB, (3, 8))
  inputs[1, 5:] = 0
  targets = rng.randint(2, VOCAB, (3, 7))
  targets[2, 5:] = 0
  decoder_inputs = np.concatenate([np.zeros((3, 1), np.int64), targets[:, :-1]], axis=1)
  return [jnp.asarray(a, jnp.int32) for a in (inputs, decoder_inputs, targets)]


_APPLY = {}


def _logits(config, params, batch):
  import jax
  from gqa_t5.model.network import Transformer
  if config not in _APPLY:  # one compilation per config beats op-by-op dispatch
    _APPLY[config] = jax.jit(lambda p, *b: Transformer(config).apply(
        {"params": p}, *b, enable_dropout=False))
  return np.asarray(_APPLY[config](params, *batch))


@pytest.fixture(scope="module")
def params():
  return synthetic.random_params(tiny_config("convert"), seed=0)


def test_synthetic_tree_is_the_networks_tree():
  import jax
  from gqa_t5.model.network import Transformer
  for kv, cross in ((None, None), (2, 1)):
    config = tiny_config("convert", num_kv_heads=kv, num_cross_kv_heads=cross)
    variables = jax.eval_shape(lambda: Transformer(config).init(
        jax.random.PRNGKey(0), *_batch(), enable_dropout=False))
    shapes = {n: tuple(v.shape) for n, v in tree_lib.flatten(variables["params"]).items()}
    assert shapes == tree_lib.expected_shapes(config)


@pytest.mark.parametrize("method", ["mean", "first", "aligned"])
def test_k_equal_n_is_the_identity(params, method):
  out, out_config = converter.convert_params(params, tiny_config("convert"), converter.ConversionSpec(N, method=method))
  assert out_config == tiny_config("convert")
  flat, flat_out = tree_lib.flatten(params), tree_lib.flatten(out)
  assert all(np.array_equal(flat[n], flat_out[n]) for n in flat)


def _with_equal_heads_in_groups(params, k):
  """Copies the first head of each group over the group's other key/value heads."""
  flat = dict(tree_lib.flatten(params))
  g, h = N // k, tiny_config("convert").head_dim
  for name in flat:
    if name.startswith("decoder/layers_") and name.endswith(("key/kernel", "value/kernel")):
      heads = flat[name].reshape(flat[name].shape[0], k, g, h).copy()
      heads[:, :, :, :] = heads[:, :, :1, :]
      flat[name] = heads.reshape(flat[name].shape)
  return tree_lib.unflatten(flat)


@pytest.mark.parametrize("method,k,cross", [("mean", 2, None), ("first", 1, 2), ("mean", 1, 1)])
def test_gqa_logits_equal_mha_logits_when_group_heads_are_equal(params, method, k, cross):
  batch = _batch()
  equal = _with_equal_heads_in_groups(params, min(k, cross or k))
  reference = _logits(tiny_config("convert"), equal, batch)
  spec = converter.ConversionSpec(k, cross, method=method)
  out, out_config = converter.convert_params(equal, tiny_config("convert"), spec)
  assert out_config.self_attention_kv_heads == k
  assert out_config.cross_attention_kv_heads == (cross or k)
  np.testing.assert_allclose(_logits(out_config, out, batch), reference, atol=1e-5, rtol=1e-5)
  # Sanity: on the original (unequal) heads the converted model does differ.
  changed, _ = converter.convert_params(params, tiny_config("convert"), spec)
  assert not np.allclose(_logits(out_config, changed, batch), _logits(tiny_config("convert"), params, batch),
                         atol=1e-3)


def test_rotated_unpooled_model_gives_the_same_logits(params):
  batch = _batch(1)
  flat = dict(tree_lib.flatten(params))
  for i in range(2):
    for layer in ("self_attention", "encoder_decoder_attention"):
      prefix = f"decoder/layers_{i}/{layer}"
      q, k, v, o = (flat[f"{prefix}/{p}/kernel"] for p in ("query", "key", "value", "out"))
      qk = pooling.head_rotations(k, N, 2)  # the rotations 'aligned' picks for K=2
      vo = pooling.head_rotations(v, N, 2)
      assert not np.allclose(qk, np.eye(6))
      for part, value in zip(("query", "key", "value", "out"),
                             pooling.rotate_attention(q, k, v, o, qk, vo)):
        flat[f"{prefix}/{part}/kernel"] = value
  rotated = tree_lib.unflatten(flat)
  np.testing.assert_allclose(_logits(tiny_config("convert"), rotated, batch),
                             _logits(tiny_config("convert"), params, batch), atol=2e-5, rtol=1e-5)


def test_aligned_conversion_changes_only_decoder_attention(params):
  out, out_config = converter.convert_params(params, tiny_config("convert"), converter.ConversionSpec(1, method="aligned"))
  assert out_config.self_attention_kv_heads == 1 and out_config.cross_attention_kv_heads == 1
  flat, flat_out = tree_lib.flatten(params), tree_lib.flatten(out)
  for name in flat:
    attention = name.startswith("decoder/layers_") and "attention/" in name
    if attention and not name.endswith(("layer_norm/scale",)):
      assert not np.array_equal(flat[name], flat_out[name]), name
    else:
      assert np.array_equal(flat[name], flat_out[name]), name
  _logits(out_config, out, _batch())  # runs as a GQA network


# ------------------------------------------------------------------------------- CLI


@pytest.fixture
def source_ckpt(tmp_path, params):
  path = str(tmp_path / "mha")
  t5x_legacy.save_t5x(path, params, step=12)
  return path


def _run(*argv):
  return cli.main([str(a) for a in argv])


def test_cli_t5x_to_t5x_copies_everything_else_bit_for_bit(tmp_path, source_ckpt, params):
  out = str(tmp_path / "gqa")
  assert _run("--input", source_ckpt, "--output", out, "--num-kv-heads", 2,
              "--num-cross-kv-heads", 1, "--method", "mean") == 0
  converted, step = t5x_legacy.load_t5x(out)
  assert step == 12
  flat, flat_out = tree_lib.flatten(params), tree_lib.flatten(converted)
  assert sorted(flat) == sorted(flat_out)
  changed = [n for n in flat if flat[n].shape != flat_out[n].shape
             or not np.array_equal(flat[n], flat_out[n])]
  assert sorted(changed) == sorted(
      f"decoder/layers_{i}/{layer}/{part}/kernel" for i in range(2)
      for layer in ("self_attention", "encoder_decoder_attention") for part in ("key", "value"))
  assert flat_out["decoder/layers_1/self_attention/key/kernel"].shape == (16, 12)
  assert flat_out["decoder/layers_1/encoder_decoder_attention/value/kernel"].shape == (16, 6)
  np.testing.assert_array_equal(flat_out["decoder/layers_0/self_attention/key/kernel"],
                                pooling.mean_pool(flat["decoder/layers_0/self_attention/key/kernel"], N, 2))
  record = json.load(open(os.path.join(out, converter.PROVENANCE_FILE)))
  assert record["source"] == os.path.abspath(source_ckpt) and record["source_format"] == "t5x"
  assert (record["method"], record["num_kv_heads"], record["num_cross_kv_heads"]) == ("mean", 2, 1)
  assert record["seed"] == 0 and record["tool_version"] and "T" in record["time"]
  assert record["output_config"]["num_kv_heads"] == 2
  assert sorted(os.listdir(tmp_path)) == ["gqa", "mha"]  # no temporary directories left


def test_cli_orbax_output_and_random_seeds(tmp_path, source_ckpt):
  outs = []
  for name, seed in (("a", 5), ("b", 5), ("c", 6)):
    out = str(tmp_path / name)
    assert _run("--input", source_ckpt, "--output", out, "--output-format", "orbax",
                "--num-kv-heads", 1, "--method", "random", "--seed", seed) == 0
    outs.append(tree_lib.flatten(orbax_format.open_orbax(out).read_all()))
  key = "decoder/layers_0/self_attention/key/kernel"
  assert outs[0][key].shape == (16, 6)
  assert np.array_equal(outs[0][key], outs[1][key]) and not np.array_equal(outs[0][key], outs[2][key])
  # Orbax in, t5x out.
  back = str(tmp_path / "back")
  assert _run("--input", str(tmp_path / "a"), "--input-format", "orbax", "--output", back,
              "--num-kv-heads", 1) == 0
  assert np.array_equal(t5x_legacy.load_t5x(back)[0]["decoder"]["layers_0"]["self_attention"]
                        ["key"]["kernel"], outs[0][key])


def test_cli_bad_head_count(tmp_path, source_ckpt, capsys):
  out = tmp_path / "out"
  assert _run("--input", source_ckpt, "--output", out, "--num-kv-heads", 3) == 1
  assert "num_kv_heads=3 does not divide the 4 query heads" in capsys.readouterr().err
  assert _run("--input", source_ckpt, "--output", out, "--num-kv-heads", 2,
              "--num-cross-kv-heads", 0) == 1
  assert "num_cross_kv_heads=0" in capsys.readouterr().err
  assert not out.exists()


def test_cli_unknown_and_undetectable_formats(tmp_path, source_ckpt, capsys):
  out = tmp_path / "out"
  assert _run("--input", source_ckpt, "--input-format", "pickle", "--output", out,
              "--num-kv-heads", 2) == 2
  assert "invalid choice: 'pickle'" in capsys.readouterr().err
  junk = tmp_path / "junk"
  junk.mkdir()
  (junk / "weights.npz").write_bytes(b"nothing")
  assert _run("--input", junk, "--output", out, "--num-kv-heads", 2) == 1
  assert f"cannot detect the checkpoint format of {junk}" in capsys.readouterr().err
  assert _run("--input", tmp_path / "missing", "--output", out, "--num-kv-heads", 2) == 1
  assert "does not exist" in capsys.readouterr().err
  assert _run("--input", junk, "--input-format", "t5x", "--output", out, "--num-kv-heads", 2) == 1
  assert "no 'checkpoint' file" in capsys.readouterr().err
  assert not out.exists()


def test_cli_existing_output_and_overwrite(tmp_path, source_ckpt, capsys):
  out = tmp_path / "out"
  out.mkdir()
  (out / "keep.txt").write_text("precious")
  assert _run("--input", source_ckpt, "--output", out, "--num-kv-heads", 2) == 1
  assert f"output path {out} already exists" in capsys.readouterr().err
  assert (out / "keep.txt").read_text() == "precious"
  assert _run("--input", source_ckpt, "--output", out, "--num-kv-heads", 2, "--overwrite") == 0
  assert not (out / "keep.txt").exists() and t5x_legacy.load_t5x(str(out))[1] == 12


def test_cli_corrupt_source_leaves_no_output(tmp_path, source_ckpt, capsys):
  chunk = os.path.join(source_ckpt, "target.decoder.layers_1.mlp.wi_0.kernel", "0.0")
  with open(chunk, "r+b") as f:
    f.truncate(10)
  for fmt in ("t5x", "orbax"):
    out = tmp_path / f"out_{fmt}"
    assert _run("--input", source_ckpt, "--output", out, "--output-format", fmt,
                "--num-kv-heads", 2) == 1
    assert "decoder/layers_1/mlp/wi_0/kernel" in capsys.readouterr().err
    assert not out.exists()
  assert sorted(os.listdir(tmp_path)) == ["mha"]


def test_cli_missing_tensor_in_source(tmp_path, params, capsys):
  flat = dict(tree_lib.flatten(params))
  del flat["decoder/layers_0/encoder_decoder_attention/key/kernel"]
  src = str(tmp_path / "src")
  t5x_legacy.save_t5x(src, tree_lib.unflatten(flat))
  assert _run("--input", src, "--output", tmp_path / "out", "--num-kv-heads", 2) == 1
  assert "decoder/layers_0/encoder_decoder_attention/key/kernel" in capsys.readouterr().err
  assert not (tmp_path / "out").exists()


def test_cli_converts_a_hugging_face_checkpoint(tmp_path):
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  from gqa_t5.checkpoints import hf
  config = transformers.T5Config(vocab_size=VOCAB, d_model=16, d_kv=6, d_ff=24, num_layers=1,
                                 num_decoder_layers=2, num_heads=N, feed_forward_proj="gated-gelu",
                                 tie_word_embeddings=False)
  torch.manual_seed(0)
  transformers.T5ForConditionalGeneration(config).save_pretrained(str(tmp_path / "hf"))
  out = tmp_path / "gqa"
  assert _run("--input", tmp_path / "hf", "--output", out, "--num-kv-heads", 1,
              "--method", "aligned") == 0
  source = tree_lib.flatten(hf.open_hf(str(tmp_path / "hf")).read_all())
  converted = tree_lib.flatten(t5x_legacy.load_t5x(str(out))[0])
  assert converted["decoder/layers_1/self_attention/key/kernel"].shape == (16, 6)
  for name in source:
    if not name.startswith("decoder/layers_") or "attention/" not in name:
      assert np.array_equal(source[name], converted[name]), name
  assert json.load(open(out / converter.PROVENANCE_FILE))["source_format"] == "hf"


# ------------------------------------------------------------------------ calibration


def test_input_grams_cover_every_layer_and_skip_padding(params):
  from gqa_t5.convert import calibration
  batch = [np.asarray(a) for a in _batch(2)]
  grams = calibration.input_grams(tiny_config("convert"), params, batch)
  assert sorted(grams) == sorted(f"decoder/layers_{i}/{layer}" for i in range(2)
                                 for layer in ("self_attention", "encoder_decoder_attention"))
  for gram in grams.values():
    assert gram.shape == (16, 16) and np.allclose(gram, gram.T)
    assert np.linalg.eigvalsh(gram).min() > -1e-9
  assert np.array_equal(grams["decoder/layers_0/encoder_decoder_attention"],
                        grams["decoder/layers_1/encoder_decoder_attention"])
  assert not np.allclose(grams["decoder/layers_0/self_attention"],
                         grams["decoder/layers_1/self_attention"])
  # An all-padding example adds no tokens: the statistics do not move.
  padded = [np.concatenate([a, np.zeros_like(a[:1])]) for a in batch]
  padded_grams = calibration.input_grams(tiny_config("convert"), params, padded)
  for name in grams:
    np.testing.assert_allclose(padded_grams[name], grams[name], rtol=1e-5, atol=1e-7)


FIXTURE = fixture_paths.T5X_TINY


def test_cli_calibrated_alignment_on_the_fixture(tmp_path, capsys):
  source = os.path.join(FIXTURE, "checkpoint_f32", "checkpoint_20")
  common = ["--input", source, "--num-kv-heads", 2, "--calibration-data",
            os.path.join(FIXTURE, "data", "train.tsv"), "--input-prefix", "name: ",
            "--calibration-examples", 16, "--input-length", 64, "--target-length", 16]
  out = tmp_path / "calibrated"
  assert _run(*common, "--output", out, "--method", "aligned") == 2  # no --vocab
  assert "--calibration-data needs --vocab" in capsys.readouterr().err
  vocab = ["--vocab", os.path.join(FIXTURE, "spm.model")]
  assert _run(*common, *vocab, "--output", out, "--method", "mean") == 1
  assert "only applies to --method aligned" in capsys.readouterr().err
  assert _run(*common, *vocab, "--output", out, "--method", "aligned") == 0
  record = json.load(open(out / converter.PROVENANCE_FILE))
  assert record["calibration"]["max_examples"] == 16
  assert record["calibration"]["data"].endswith("train.tsv")
  converted = tree_lib.flatten(t5x_legacy.load_t5x(str(out))[0])
  weights_only = str(tmp_path / "weights")
  assert _run("--input", source, "--num-kv-heads", 2, "--method", "aligned", "--output",
              weights_only) == 0
  other = tree_lib.flatten(t5x_legacy.load_t5x(weights_only)[0])
  key = "decoder/layers_0/self_attention/key/kernel"
  assert converted[key].shape == (128, 64) and not np.allclose(converted[key], other[key])
