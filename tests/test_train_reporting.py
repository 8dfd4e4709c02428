"""What a training run shows a user: one loss (per target token) identical in the progress
bar, metrics.jsonl and TensorBoard; evaluation lines on their own line; gin lookup that
survives same-named folders in the working directory; vocabulary mismatches refused; quiet
logs on a machine without a GPU; JAX's compilation cache switched by one flag."""

import errno
import glob
import json
import os
import re
import subprocess

import jax
import numpy as np
import pytest

import file_limits
import trainer_fixtures as fx
from gqa_t5 import gin_utils, jax_setup, optim, schedules
from gqa_t5 import train as train_lib
from gqa_t5.checkpoints import model_dir as model_dir_lib


@pytest.fixture(scope="module", autouse=True)
def _toy_task():
  fx.register_toy_task()


def _tensorboard_scalars(log_dir, tag):
  import tensorflow as tf  # pylint: disable=g-import-not-at-top  # optional heavy extra
  values = {}
  for path in glob.glob(os.path.join(log_dir, "events.*")):
    for event in tf.compat.v1.train.summary_iterator(path):
      for value in event.summary.value:
        if value.tag == tag:
          values[event.step] = float(tf.make_ndarray(value.tensor))
  return values


def test_loss_per_token_is_the_same_in_bar_jsonl_and_tensorboard(tmp_path, capsys):
  train_lib.train(
      model=fx.tiny_model(2), train_dataset_cfg=fx.dataset_cfg(), model_dir=str(tmp_path),
      total_steps=4, optimizer=optim.Adafactor(learning_rate=schedules.constant(0.05)),
      log_period=2, eval_period=4, eval_steps=1, progress=True,
      train_eval_dataset_cfg=fx.dataset_cfg("validation", shuffle=False),
      checkpoint_cfg=model_dir_lib.CheckpointConfig(period=1000, async_save=False))
  err = capsys.readouterr().err
  bar = {int(s): float(v) for s, v in re.findall(r"step (\d+)/4 \|[^\r\n]*? loss ([0-9.]+) \|",
                                                 err)}
  with open(os.path.join(tmp_path, model_dir_lib.METRICS_FILE)) as f:
    rows = [json.loads(line) for line in f]
  logged = {r["step"]: r for r in rows if r["split"] == "train"}
  board = _tensorboard_scalars(os.path.join(tmp_path, "train"), "loss")
  assert sorted(logged) == [2, 4] and sorted(board) == [2, 4]
  for step in (2, 4):
    assert bar[step] == round(logged[step]["loss"], 4)
    np.testing.assert_allclose(board[step], logged[step]["loss"], rtol=1e-6)
    # Per token (log 320 = 5.8 at random init), not summed over the batch's tokens.
    assert 0 < logged[step]["loss"] < 7 < logged[step]["summed_loss"]
  assert "| |" not in err and "loss  |" not in err  # never a bar with an empty loss field
  assert re.search(r"\rstep 4 training_eval: [^\r\n]*loss [0-9.]+[^\r\n]*\n", err)


def test_a_model_vocabulary_that_does_not_fit_the_task_is_refused(tmp_path):
  with pytest.raises(ValueError, match=r"vocab_size is 32128 but the 'inputs' vocabulary of "
                                       r"task .* has 259 ids: set network.T5Config.vocab_size "
                                       r"= 384"):
    train_lib.train(model=fx.tiny_model(2, vocab_size=32128),
                    train_dataset_cfg=fx.dataset_cfg(), model_dir=str(tmp_path), total_steps=1,
                    progress=False)
  assert not os.path.exists(os.path.join(tmp_path, model_dir_lib.CHECKPOINTS_DIR))


@pytest.mark.parametrize("folders", [("runs",), ("runs", "attention", "t5_1_1")])
def test_gin_lookup_with_same_named_folders_in_the_working_directory(tmp_path, monkeypatch,
                                                                     folders):
  for folder in folders:
    (tmp_path / folder).mkdir()
  monkeypatch.chdir(tmp_path)
  # runs/pretrain.gin also includes runs/_common_train.gin.
  gin_utils.parse(["t5_1_1/tiny.gin", "attention/gqa_2.gin", "runs/pretrain.gin"],
                  ["MODEL_DIR='/tmp/unused'", "MIXTURE_OR_TASK_NAME='x'", "TRAIN_STEPS=1",
                   "TASK_FEATURE_LENGTHS={'inputs': 8, 'targets': 8}"])
  assert gin_utils.macro_value("TRAIN_STEPS") == 1


def test_quiet_logs_drop_cuda_probing_but_not_other_messages():
  code = ("import os, sys; from gqa_t5 import jax_setup; jax_setup.quiet_logs()\n"
          "with jax_setup.filtered_stderr(jax_setup.TF_NOISE):\n"
          "  os.write(2, b'failed call to cuInit: noise\\nE0000 a real error\\n')\n"
          "print('done', file=sys.stderr)")
  env = fx.subprocess_env()
  env.pop("TF_CPP_MIN_LOG_LEVEL", None)
  result = subprocess.run([fx.PYTHON, "-c", code], env=env, capture_output=True, text=True,
                          timeout=900, check=True)
  assert "a real error" in result.stderr and "done" in result.stderr
  assert "Could not find cuda drivers" not in result.stderr
  assert "cuInit" not in result.stderr


def test_compilation_cache_flag_default_and_off(tmp_path, monkeypatch):
  monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
  assert jax_setup.default_cache_dir() == str(tmp_path / "xdg" / "gqa_t5" / "jax")
  previous = jax.config.jax_compilation_cache_dir
  try:
    assert jax_setup.enable_compilation_cache("") is None
    assert jax.config.jax_compilation_cache_dir == previous
    path = jax_setup.enable_compilation_cache(tmp_path / "cache")
    assert path == str(tmp_path / "cache") and os.path.isdir(path)
    assert jax.config.jax_compilation_cache_dir == path
  finally:
    jax.config.update("jax_compilation_cache_dir", previous)


def test_metrics_jsonl_that_cannot_grow_names_its_file(tmp_path):
  """A real failed append to metrics.jsonl (past a file-size limit, as on a full disk): the
  system's error names no file, the one raised names metrics.jsonl."""
  out = file_limits.run_with_file_size_limit(
      "from gqa_t5 import metrics_writer\n"
      f"writer = metrics_writer.MetricsWriter({str(tmp_path)!r}, tensorboard=False)",
      "try:\n"
      "  for step in range(1000):\n"
      "    writer.write(step, {'loss': 1.0})\n"
      "except OSError as error:\n"
      "  print(error.errno, error.filename, sep='|')", limit=4096)
  assert out.strip() == f"{errno.EFBIG}|{tmp_path / model_dir_lib.METRICS_FILE}"


def test_tensorboard_summaries_that_cannot_grow_name_their_file_in_one_error(tmp_path):
  """A real failed write of TensorBoard's events file (past a file-size limit, as on a full
  disk): TensorFlow's own error type becomes an OSError naming the folder and the events file,
  which the entry points report in one line like any other full disk."""
  pytest.importorskip("clu")
  out = file_limits.run_with_file_size_limit(
      "from gqa_t5 import metrics_writer\n"
      f"writer = metrics_writer.MetricsWriter({str(tmp_path)!r})\n"
      "writer.write(0, {'loss': 1.0})",  # the events file exists before the limit
      "try:\n"
      "  for step in range(1, 2000):\n"
      "    writer.write(step, {f'scalar_{i}': 1.0 for i in range(40)})\n"
      "    writer.flush()\n"
      "except OSError as error:\n"
      "  print(type(error).__name__, error, sep='|')", limit=16384)
  kind, message = out.strip().splitlines()[-1].split("|", 1)
  assert kind == "OSError", out
  assert message.startswith(f"cannot write TensorBoard summaries in {tmp_path / 'train'}: "
                            f"{tmp_path / 'train'}/events.out.tfevents."), message
  assert "{{" not in message and "\n" not in message
