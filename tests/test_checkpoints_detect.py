"""Format detection and the one-call readers the trainer uses (load_params / load_checkpoint)."""

import shutil

import numpy as np
import pytest

from gqa_t5.checkpoints import orbax_format, synthetic, t5x_legacy
from gqa_t5.checkpoints import tree as tree_lib
from gqa_t5.checkpoints.detect import detect_format, load_checkpoint, load_params, open_checkpoint
from gqa_t5.checkpoints.errors import CheckpointError
from tiny_configs import tiny_config

CONFIG = tiny_config("checkpoint", num_encoder_layers=1)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
  root = tmp_path_factory.mktemp("ckpts")
  params = synthetic.random_params(CONFIG, seed=4)
  t5x_legacy.save_t5x(str(root / "t5x"), params, step=3)
  orbax_format.save_orbax(str(root / "orbax"), params, step=4)
  return root, params


def test_detects_t5x_and_orbax(checkpoints):
  root, _ = checkpoints
  assert detect_format(str(root / "t5x")) == "t5x"
  assert detect_format(str(root / "t5x" / "checkpoint")) == "t5x"
  assert detect_format(str(root / "orbax")) == "orbax"
  assert detect_format(str(root / "orbax" / "state")) == "orbax"


def test_detects_hf(tmp_path):
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  config = transformers.T5Config(vocab_size=50, d_model=16, d_kv=8, d_ff=24, num_layers=1,
                                 num_heads=4, feed_forward_proj="gated-gelu")
  torch.manual_seed(0)
  transformers.T5ForConditionalGeneration(config).save_pretrained(str(tmp_path))
  assert detect_format(str(tmp_path)) == "hf"
  assert open_checkpoint(str(tmp_path)).format == "hf"


def test_load_params_and_checkpoint(checkpoints):
  root, params = checkpoints
  for name, step in (("t5x", 3), ("orbax", 4)):
    loaded, got_step, config = load_checkpoint(str(root / name))
    assert got_step == step and config.num_decoder_layers == 2
    flat, flat_loaded = tree_lib.flatten(params), tree_lib.flatten(loaded)
    assert all(np.array_equal(flat[n], flat_loaded[n]) for n in flat)
  bf16 = load_params(str(root / "t5x"), dtype="bfloat16")
  assert bf16["decoder"]["decoder_norm"]["scale"].dtype.name == "bfloat16"


def test_load_params_checks_the_callers_config(checkpoints):
  root, _ = checkpoints
  assert load_params(str(root / "t5x"), config=CONFIG)["token_embedder"]["embedding"].shape == (50, 16)
  gqa = CONFIG.replace(num_kv_heads=2)
  with pytest.raises(CheckpointError, match=r"'decoder/layers_0/self_attention/key/kernel' has "
                     r"shape \(16, 32\), expected \(16, 16\)"):
    load_params(str(root / "orbax"), config=gqa)


def test_a_t5x_model_dir_names_its_latest_checkpoint(tmp_path, checkpoints):
  """T5X's MODEL_DIR (checkpoint_<step>/ folders) given where a checkpoint is expected: the
  error says so and names the latest one to pass (numerically latest, not by name)."""
  root, _ = checkpoints
  model_dir = tmp_path / "t5x_model_dir"
  for step in (900, 1000, 20, 100):
    shutil.copytree(root / "t5x", model_dir / f"checkpoint_{step}")
  (model_dir / "checkpoint_5.tmp-1234").mkdir()  # an interrupted save: not a checkpoint
  (model_dir / "config.gin").write_text("")
  with pytest.raises(CheckpointError) as error:
    detect_format(str(model_dir))
  message = str(error.value)
  assert "T5X model directory holding 4 checkpoint(s) (steps ..., 100, 900, 1000)" in message
  assert message.endswith(f"the latest, {model_dir / 'checkpoint_1000'}")
  assert detect_format(str(model_dir / "checkpoint_1000")) == "t5x"


def test_unknown_and_undetectable(tmp_path, checkpoints):
  root, _ = checkpoints
  with pytest.raises(CheckpointError, match="does not exist"):
    detect_format(str(tmp_path / "nothing"))
  (tmp_path / "empty").mkdir()
  with pytest.raises(CheckpointError, match="cannot detect the checkpoint format"):
    detect_format(str(tmp_path / "empty"))
  with pytest.raises(CheckpointError, match="unknown checkpoint format 'npz'"):
    open_checkpoint(str(root / "t5x"), format="npz")
  # A TF-style text 'checkpoint' file is not mistaken for t5x's msgpack one.
  (tmp_path / "tfdir").mkdir()
  (tmp_path / "tfdir" / "checkpoint").write_text('model_checkpoint_path: "model.ckpt-5"\n')
  with pytest.raises(CheckpointError, match="cannot detect"):
    detect_format(str(tmp_path / "tfdir"))
  # The wrong explicit format gives that format's own error.
  with pytest.raises(CheckpointError, match="not an Orbax checkpoint"):
    open_checkpoint(str(root / "t5x"), format="orbax")
