"""Faults a training run must refuse or survive without leaving anything wrong behind: a
non-finite update (no non-finite checkpoint, a stop naming the step, the batch and the last
verified checkpoint), gin typos in files and flags, impossible span-corruption lengths."""

import os
import signal

import jax
import jax.numpy as jnp
import pytest

import trainer_fixtures as fx
from gqa_t5 import gin_utils, input_pipeline, optim, partitioning, schedules
from gqa_t5 import train as train_lib
from gqa_t5 import trainer as trainer_lib
from gqa_t5.checkpoints import model_dir as model_dir_lib
from gqa_t5.tasks import span_corruption

BASE_FILES = ["t5_1_1/tiny.gin", "attention/gqa_2.gin", "runs/pretrain.gin"]
BASE_BINDINGS = ["MODEL_DIR='/tmp/unused'", "MIXTURE_OR_TASK_NAME='x'",
                 "TASK_FEATURE_LENGTHS={'inputs': 8, 'targets': 8}"]


@pytest.fixture(scope="module", autouse=True)
def _toy_task():
  fx.register_toy_task()


class _NaNGradientFromSecondStep(fx.PoisonedModel):
  """Finite losses throughout, but the gradient of step 2 is NaN (0 * inf): the second update
  makes the parameters non-finite, as a learning rate far too high does."""

  def loss_fn(self, params, batch, rng):
    loss, metrics = self._model.loss_fn(params, batch, rng)
    scale = params["decoder"]["decoder_norm"]["scale"][0]
    after_first = jnp.where(scale == 1.0, 1.0, 0.0)
    poison = jnp.sqrt(after_first + 0.0 * scale) - after_first  # 0, gradient NaN at step 2
    return loss + poison, dict(metrics, loss=metrics["loss"] + poison)


def test_non_finite_update_is_never_checkpointed_and_stop_names_step_batch_checkpoint(tmp_path):
  with pytest.raises(trainer_lib.NonFiniteLossError) as info:
    train_lib.train(
        model=_NaNGradientFromSecondStep(fx.tiny_model(2)), train_dataset_cfg=fx.dataset_cfg(),
        model_dir=str(tmp_path), total_steps=5, progress=False, eval_period=0, log_period=5,
        optimizer=optim.Adafactor(learning_rate=schedules.constant(0.05)),
        checkpoint_cfg=model_dir_lib.CheckpointConfig(period=1, async_save=False))
  message = str(info.value)
  assert "non-finite at step 2" in message
  assert "train batch 1 of the input stream" in message
  assert "The last checkpoint is step 1" in message and "all finite" in message
  checkpointer = model_dir_lib.Checkpointer(str(tmp_path))
  assert checkpointer.all_steps() == [1]


class _SignalAtStep(fx.PoisonedModel):
  """Sends this process `signum` while the loss of the step from `step` is traced: the signal
  arrives mid-step, as a preemption does."""

  def __init__(self, model, signum):
    super().__init__(model)
    self._signum = signum

  def loss_fn(self, params, batch, rng):
    os.kill(os.getpid(), self._signum)  # at trace time: during the first step
    return self._model.loss_fn(params, batch, rng)


def test_a_signal_without_save_on_preemption_stops_after_the_step_saving_nothing(tmp_path):
  # A backgrounded shell starts the tests with SIGINT ignored, and an ignored signal stays
  # ignored (by design): give this test an ordinary SIGINT disposition.
  previous = signal.signal(signal.SIGINT, signal.default_int_handler)
  try:
    with pytest.raises(model_dir_lib.Preempted) as info:
      train_lib.train(
          model=_SignalAtStep(fx.tiny_model(2), signal.SIGINT),
          train_dataset_cfg=fx.dataset_cfg(), model_dir=str(tmp_path), total_steps=5,
          progress=False, eval_period=0, log_period=5,
          optimizer=optim.Adafactor(learning_rate=schedules.constant(0.05)),
          checkpoint_cfg=model_dir_lib.CheckpointConfig(period=4, save_on_preemption=False))
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # restored
  finally:
    signal.signal(signal.SIGINT, previous)
  assert info.value.exit_code == 130 and info.value.step == 1 and info.value.saved_step is None
  assert "stopped by SIGINT at step 1: no checkpoint saved" in str(info.value)
  assert model_dir_lib.checkpoint_steps(str(tmp_path)) == []
  assert not os.path.exists(tmp_path / model_dir_lib.LOCK_FILE)


def test_last_finite_step_reads_checkpoints_back_and_skips_non_finite_ones(tmp_path):
  trainer = trainer_lib.Trainer(fx.tiny_model(2), optim.Adafactor(learning_rate=0.01),
                                partitioning.Partitioner(),
                                input_pipeline.model_feature_spec(fx.dataset_cfg()))
  state = trainer.init_state(step=3)
  assert trainer.state_is_finite(state)
  bad = state.replace(step=jnp.asarray(4, jnp.int32), params=jax.tree.map(
      lambda p: p.at[(0,) * p.ndim].set(jnp.nan), state.params))
  assert not trainer.state_is_finite(bad)
  checkpointer = model_dir_lib.Checkpointer(
      str(tmp_path), model_dir_lib.CheckpointConfig(async_save=False))
  checkpointer.save(state, {"position": 3})
  checkpointer.save(bad, {"position": 4})  # written by hand: the loop never does
  step, skipped = checkpointer.last_finite_step(trainer.abstract_state)
  checkpointer.close()
  assert step == 3 and list(skipped) == [4]
  assert len(skipped[4]) == len(jax.tree.leaves(state.params))
  assert any(name.endswith("decoder_norm/scale") for name in skipped[4])


@pytest.mark.parametrize("binding,typo,known", [
    ("TRAIN_STEP=3", "TRAIN_STEP", "TRAIN_STEPS"),
    ("CHECKPOINT_PERIODD=5", "CHECKPOINT_PERIODD", "CHECKPOINT_PERIOD")])
def test_a_macro_nothing_reads_is_refused_with_the_closest_name(binding, typo, known):
  with pytest.raises(gin_utils.GinConfigError,
                     match=rf"gin macro {typo} is set but no binding reads it; did you mean "
                           rf"{known}\?"):
    gin_utils.parse(BASE_FILES, BASE_BINDINGS + ["TRAIN_STEPS=3", binding])


def test_a_macro_typo_in_a_gin_file_is_refused(tmp_path):
  user_file = tmp_path / "my_run.gin"
  user_file.write_text("include 'runs/pretrain.gin'\nCHECKPOINT_PERIODD = 5\n")
  with pytest.raises(gin_utils.GinConfigError, match=r"CHECKPOINT_PERIODD .*CHECKPOINT_PERIOD\?"):
    gin_utils.parse(BASE_FILES[:2] + [str(user_file)], BASE_BINDINGS + ["TRAIN_STEPS=3"])


def test_the_entry_point_refuses_a_flag_typo_with_status_2(capsys):
  flags = [f"--gin_file={f}" for f in BASE_FILES] + [f"--gin.{b}" for b in BASE_BINDINGS]
  assert train_lib.main(flags + ["--gin.TRAIN_STEP=3", "--jax_cache_dir="]) == 2
  assert "did you mean TRAIN_STEPS?" in capsys.readouterr().err


def test_a_binding_to_an_unknown_parameter_names_the_closest_one():
  with pytest.raises(gin_utils.GinConfigError, match=r"eval_perod.*\n  did you mean eval_period\?"):
    gin_utils.parse(BASE_FILES, BASE_BINDINGS + ["TRAIN_STEPS=3", "train.train.eval_perod=3"])


def test_macros_the_repository_defines_may_go_unread():
  # base.gin's OPTIMIZER is read by train runs only: an eval run must still parse.
  gin_utils.parse(["t5_1_1/tiny.gin", "runs/eval.gin"],
                  ["MIXTURE_OR_TASK_NAME='x'", "TASK_FEATURE_LENGTHS={'inputs': 8, 'targets': 8}",
                   "CHECKPOINT_PATH='x'", "EVAL_OUTPUT_DIR='x'"])
  assert "OPTIMIZER" in gin_utils.repository_macros()


def test_span_corruption_refuses_targets_too_short_naming_both_lengths():
  assert span_corruption.check_targets_length(512, 114) == 114
  with pytest.raises(ValueError, match=r"inputs length 512 .* targets of 114 tokens, but the "
                                       r"targets length is 4"):
    span_corruption.span_corruption(None, {"inputs": 512, "targets": 4}, {})


@pytest.mark.parametrize("feature", ["inputs", "targets"])
def test_lengths_of_zero_are_refused_naming_the_feature(feature):
  lengths = {"inputs": 16, "targets": 16, feature: 0}
  with pytest.raises(ValueError, match=rf"'{feature}' length must be positive, got 0"):
    span_corruption.span_corruption(None, lengths, {})
  cfg = input_pipeline.DatasetConfig(fx.TOY_TASK, lengths)
  with pytest.raises(ValueError, match=rf"TASK_FEATURE_LENGTHS\['{feature}'\] must be a "
                                       rf"positive integer, got 0"):
    input_pipeline.model_feature_spec(cfg)
