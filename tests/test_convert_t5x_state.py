"""`gqa-t5 convert --output-format t5x` writes what t5x restores with no extra flags: t5x's
Adafactor state (checked against the state t5x itself wrote in the fixture), scanned or
unrolled layers, a scanned input detected; with t5x installed, against t5x's own optimizer."""

import os

import numpy as np
import pytest

import fixture_paths
from gqa_t5.checkpoints import t5x_legacy
from gqa_t5.checkpoints import tree as tree_lib
from gqa_t5.convert import cli, t5x_state

SOURCE = os.path.join(fixture_paths.T5X_TINY, "checkpoint_f32", "checkpoint_20")
N, H, L_ENC, L_DEC = 8, 32, 3, 2  # the fixture's heads, head dim, layers (FIXTURE.md)


def _convert(*argv):
  return cli.main(["--input", SOURCE, "--quiet"] + [str(a) for a in argv])


def _flat_state(path):
  """{name: leaf} of the msgpack tree, a tensorstore spec dict counting as one leaf."""
  def flat(node, prefix=""):
    out = {}
    for key, value in node.items():
      name = f"{prefix}/{key}" if prefix else key
      if isinstance(value, dict) and "driver" not in value:
        out.update(flat(value, name))
      else:
        out[name] = value
    return out
  return flat(t5x_legacy.read_state(path)[1])


def _shape(leaf):
  return tuple(leaf["metadata"]["shape"]) if isinstance(leaf, dict) else np.shape(leaf)


def _param_state_shapes(path):
  return {name[len("optimizer/state/param_states/"):]: _shape(leaf)
          for name, leaf in _flat_state(path).items()
          if name.startswith("optimizer/state/param_states/")}


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
  """The fixture converted to GQA-2, unrolled and scanned, and to MQA from the scanned one."""
  out = tmp_path_factory.mktemp("converted")
  paths = {"gqa2": out / "gqa2" / "checkpoint_20", "gqa2_scanned": out / "s" / "checkpoint_20",
           "mqa_from_scanned": out / "mqa" / "checkpoint_20"}
  assert _convert("--output", paths["gqa2"], "--num-kv-heads", 2) == 0
  assert _convert("--output", paths["gqa2_scanned"], "--num-kv-heads", 2, "--scan-layers") == 0
  assert cli.main(["--input", str(paths["gqa2_scanned"]), "--output",
                   str(paths["mqa_from_scanned"]), "--num-kv-heads", "1", "--no-scan-layers",
                   "--quiet"]) == 0
  return paths


def test_unrolled_state_has_the_shapes_t5x_wrote_for_the_fixture(converted):
  ours = _param_state_shapes(converted["gqa2"])
  theirs = _param_state_shapes(SOURCE)  # t5x's own Adafactor state for the MHA model
  assert set(ours) == set(theirs)
  kernels = [f"decoder/layers_{i}/{a}/{p}/kernel" for i in range(L_DEC)
             for a in ("self_attention", "encoder_decoder_attention") for p in ("key", "value")]
  pooled = {f"{k}/{leaf}" for k in kernels for leaf in ("v_row", "v_col", "v")}
  for kernel in kernels:
    # [128, 256] was factored; the pooled [128, 64] is not (64 < min_dim_size_to_factor 128):
    # t5x keeps its full second moment instead.
    assert (theirs[f"{kernel}/v_col"], theirs[f"{kernel}/v"]) == ((N * H,), (1,))
    assert (ours[f"{kernel}/v_row"], ours[f"{kernel}/v_col"]) == ((1,), (1,))
    assert ours[f"{kernel}/v"] == (128, 2 * H)
  assert {n: s for n, s in ours.items() if n not in pooled} == \
      {n: s for n, s in theirs.items() if n not in pooled}
  state = _flat_state(converted["gqa2"])
  assert int(state["optimizer/state/step"]) == 20 and state["version"] == 3
  inline = [v for n, v in state.items() if "param_states" in n and not isinstance(v, dict)]
  assert inline and all(np.asarray(v).dtype == np.float32 and not np.any(v) for v in inline)
  # The full second moments (norm scales, relative position tables) are zarr arrays of zeros.
  source = t5x_legacy.open_t5x(converted["gqa2"])
  assert "encoder/layers_0/mlp/wo/kernel" in source.tensors and not source.scanned
  ckpt_dir, _ = t5x_legacy.read_state(converted["gqa2"])
  v = t5x_legacy.read_zarr(os.path.join(ckpt_dir, "state.param_states.encoder.relpos_bias."
                                                  "rel_embedding.v"), "v", np.float32)
  assert v.shape == (N, 32) and not np.any(v)


def test_scanned_output_stacks_layers_and_factors_within_each_layer(converted):
  state = _flat_state(converted["gqa2_scanned"])
  target = {n[len("optimizer/target/"):]: _shape(v) for n, v in state.items()
            if n.startswith("optimizer/target/")}
  assert target["encoder/layers/mlp/wi_0/kernel"] == (128, L_ENC, 256)  # [in, layers, out]
  assert target["decoder/layers/self_attention/key/kernel"] == (128, L_DEC, 2 * H)
  assert target["decoder/layers/pre_mlp_layer_norm/scale"] == (128, L_DEC)
  assert not any("layers_" in n for n in target)
  states = _param_state_shapes(converted["gqa2_scanned"])
  assert states["encoder/layers/mlp/wo/kernel/v_row"] == (L_ENC, 128)  # embed: the row
  assert states["encoder/layers/mlp/wo/kernel/v_col"] == (256, L_ENC)
  # Scanned kernels follow the factor rules, whatever their size (t5x's rule for 'layers').
  assert states["decoder/layers/self_attention/key/kernel/v_col"] == (L_DEC, 2 * H)
  assert states["decoder/layers/pre_mlp_layer_norm/scale/v"] == (128, L_DEC)
  assert states["decoder/layers/pre_mlp_layer_norm/scale/v_row"] == (1,)
  # Read back, the scanned checkpoint is detected and is the unrolled one, bit for bit.
  scanned = t5x_legacy.open_t5x(converted["gqa2_scanned"])
  unrolled = t5x_legacy.open_t5x(converted["gqa2"])
  assert scanned.scanned and scanned.config == unrolled.config
  for name, tensor in unrolled.tensors.items():
    np.testing.assert_array_equal(scanned.tensors[name].read(), tensor.read(), err_msg=name)


def test_scanned_input_converts_like_an_unrolled_one(converted, tmp_path):
  assert cli.main(["--input", str(converted["gqa2"]), "--output", str(tmp_path / "mqa"),
                   "--num-kv-heads", "1", "--quiet"]) == 0
  via_unrolled = tree_lib.flatten(t5x_legacy.load_t5x(str(tmp_path / "mqa"))[0])
  via_scanned = tree_lib.flatten(t5x_legacy.load_t5x(str(converted["mqa_from_scanned"]))[0])
  assert set(via_scanned) == set(via_unrolled)
  for name, value in via_unrolled.items():
    np.testing.assert_array_equal(via_scanned[name], value, err_msg=name)
  assert _param_state_shapes(converted["mqa_from_scanned"]) == \
      _param_state_shapes(tmp_path / "mqa")


def test_parameters_only_and_a_missing_parent_folder(tmp_path, capsys):
  out = tmp_path / "new" / "folders" / "gqa"
  assert cli.main(["--input", SOURCE, "--output", str(out), "--num-kv-heads", "2",
                   "--optimizer-state", "none"]) == 0
  assert "folder named checkpoint_<step>" in capsys.readouterr().err  # t5x's naming rule
  assert "param_states" not in t5x_legacy.read_state(str(out))[1]["optimizer"]["state"]
  # A failed conversion removes the folders it created.
  assert _convert("--output", tmp_path / "other" / "gqa", "--num-kv-heads", 3) == 1
  assert not (tmp_path / "other").exists()


def test_a_layout_t5x_could_not_restore_is_refused_naming_the_parameter():
  config = t5x_legacy.open_t5x(SOURCE).config
  shapes, _ = t5x_state.model_shapes_and_axes(config)
  shapes.pop("decoder/decoder_norm/scale")
  with pytest.raises(Exception, match=r"decoder/decoder_norm/scale missing"):
    t5x_state.adafactor_state_shapes(config, shapes)


def test_state_shapes_are_t5x_adafactors_own(converted):
  """Where t5x is installed: its Adafactor, given our network's logical axes and the rules
  gin/t5x/gqa_t5_network.gin binds, creates exactly the state the converter wrote."""
  pytest.importorskip("t5x")
  import flax
  import jax
  from jax.sharding import PartitionSpec
  from t5x import adafactor
  from gqa_t5 import t5x_compat
  for key, k, scan in (("gqa2", 2, False), ("gqa2_scanned", 2, True)):
    config = t5x_legacy.open_t5x(converted[key]).config.replace(num_kv_heads=k,
                                                                  scan_layers=scan)
    shapes, axes = t5x_state.model_shapes_and_axes(config)
    params = tree_lib.unflatten({n: jax.ShapeDtypeStruct(s, np.float32)
                                 for n, s in shapes.items()})
    optimizer = adafactor.Adafactor(decay_rate=0.8, step_offset=0,
                                    logical_factor_rules=t5x_compat.logical_factor_rules())
    optimizer.set_param_axes(tree_lib.unflatten({n: PartitionSpec(*a) for n, a in axes.items()}))
    state = flax.serialization.to_state_dict(jax.eval_shape(optimizer.init_state, params))
    theirs = {n: tuple(v.shape) for n, v in
              tree_lib.flatten(flax.core.unfreeze(state["param_states"])).items()}
    assert _param_state_shapes(converted[key]) == theirs
