"""The training loop on a tiny model and a toy seqio task, in this process (one CPU device)."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fixture_paths

# The training runs read seqio tasks and gin files: the data extra (absent on a TF-free GPU box,
# where benchmark-train exercises the Trainer instead).
pytest.importorskip("seqio")
pytest.importorskip("gin")

import trainer_fixtures as fx
from gqa_t5 import initial_checkpoint, input_pipeline, optim, partitioning, schedules
from gqa_t5 import train as train_lib
from gqa_t5.checkpoints import model_dir as model_dir_lib
from gqa_t5 import trainer as trainer_lib
from tiny_configs import tiny_config

FIXTURE = fixture_paths.T5X_TINY


@pytest.fixture(scope="module", autouse=True)
def _toy_task():
  fx.register_toy_task()


def _read_metrics(model_dir):
  with open(os.path.join(model_dir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def _train(model_dir, model, steps, **kwargs):
  args = dict(model=model, train_dataset_cfg=fx.dataset_cfg(), model_dir=str(model_dir),
              total_steps=steps, optimizer=optim.Adafactor(learning_rate=schedules.constant(0.05)),
              eval_period=0, log_period=steps, progress=False,
              checkpoint_cfg=model_dir_lib.CheckpointConfig(period=1000, async_save=False))
  args.update(kwargs)
  return train_lib.train(**args)


@pytest.mark.parametrize("num_kv_heads", [4, 2, 1])
def test_train_eval_and_inference_eval_for_each_kv_head_count(tmp_path, num_kv_heads):
  state = _train(
      tmp_path, fx.tiny_model(num_kv_heads), 4,
      train_eval_dataset_cfg=fx.dataset_cfg("validation", shuffle=False),
      infer_eval_dataset_cfg=fx.dataset_cfg("validation", shuffle=False, pack=False),
      eval_period=4, eval_steps=2, infer_eval_num_examples=16, log_period=2)
  assert int(state.step) == 4
  kernel = state.params["decoder"]["layers_0"]["self_attention"]["key"]["kernel"]
  assert kernel.shape == (32, num_kv_heads * 8)
  rows = _read_metrics(tmp_path)
  splits = {r["split"] for r in rows}
  assert splits == {"train", "training_eval", "inference_eval"}
  train_rows = [r for r in rows if r["split"] == "train"]
  assert [r["step"] for r in train_rows] == [2, 4]
  for r in train_rows:
    assert np.isfinite(r["loss"]) and 0 < r["accuracy"] <= 1 and r["tokens_per_second"] > 0
  tf_eval = [r for r in rows if r["split"] == "training_eval"][0]
  assert np.isfinite(tf_eval["loss_per_nonpadding_target_token"])
  infer = [r for r in rows if r["split"] == "inference_eval"][0]
  assert 0.0 <= infer[f"{fx.TOY_TASK}/sequence_accuracy"] <= 100.0
  assert model_dir_lib.Checkpointer(str(tmp_path)).latest_step() == 4
  # TensorBoard event files beside the JSON lines.
  assert any(name.startswith("events.out") for name in os.listdir(tmp_path / "train"))


def test_loss_falls_on_a_learnable_task(tmp_path):
  _train(tmp_path, fx.tiny_model(2), 40, log_period=10)
  losses = [r["loss_per_nonpadding_target_token"] for r in _read_metrics(tmp_path)
            if r["split"] == "train"]
  assert len(losses) == 4
  # Random init over a 320-id vocabulary starts near ln(320) = 5.8; the copy task over 8
  # letters is below ln(8) = 2.1 once the model copies at all.
  assert losses[0] > 3.0
  assert losses[-1] < 2.2, losses
  assert losses[-1] < losses[0] - 1.5, losses


def _trainer(model, num_microbatches=None, batch_size=8):
  batches = input_pipeline.TrainBatches(fx.dataset_cfg(batch_size=batch_size))
  spec = {k: ((batch_size,) + s[1:], d) for k, (s, d) in batches.element_spec().items()}
  trainer = trainer_lib.Trainer(model, optim.Adafactor(learning_rate=0.01),
                                partitioning.Partitioner(), spec, num_microbatches)
  return trainer, batches


def test_gradient_accumulation_matches_the_full_batch():
  model = fx.tiny_model(2)
  full, batches = _trainer(model)
  micro, _ = _trainer(model, num_microbatches=4)
  batch = full.shard_batch(next(batches))
  initial = jax.device_get(full.init_state())  # one initialisation for both
  s_full, m_full = full.train_step(jax.device_put(initial, full.state_shardings), batch)
  s_micro, m_micro = micro.train_step(jax.device_put(initial, micro.state_shardings), batch)
  # Summed (unnormalised) losses and gradients add up exactly over micro-batches.
  np.testing.assert_allclose(float(m_full["loss"]), float(m_micro["loss"]), rtol=1e-5)
  assert float(m_full["weight_sum"]) == float(m_micro["weight_sum"])
  for a, b in zip(jax.tree.leaves(s_full.params), jax.tree.leaves(s_micro.params)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-4, atol=2e-6)
  assert int(s_micro.step) == 1


class _NaNAfterFirstStep(fx.PoisonedModel):
  """A model whose loss becomes NaN from the second step on."""

  def loss_fn(self, params, batch, rng):
    loss, metrics = self._model.loss_fn(params, batch, rng)
    step_scale = params["decoder"]["decoder_norm"]["scale"][0]
    # The first update moves every parameter: the scale leaves 1.0 after step 1.
    poisoned = jnp.where(step_scale == 1.0, loss, jnp.nan)
    metrics = dict(metrics, loss=poisoned)
    return poisoned, metrics


def test_non_finite_loss_stops_the_run_naming_the_step(tmp_path):
  with pytest.raises(trainer_lib.NonFiniteLossError, match=r"loss is nan at step 2"):
    _train(tmp_path, _NaNAfterFirstStep(fx.tiny_model(2)), 6,
           checkpoint_cfg=model_dir_lib.CheckpointConfig(period=2, async_save=False))
  # Nothing computed from the NaN step was saved.
  assert model_dir_lib.Checkpointer(str(tmp_path)).all_steps() == []


def test_unknown_task_is_refused_before_any_compute(tmp_path):
  cfg = input_pipeline.DatasetConfig(fx.TOY_TASK + "_typo", dict(fx.LENGTHS),
                                     module="trainer_fixtures:register_toy_task")
  with pytest.raises(ValueError, match=r"unknown seqio task or mixture "
                                       r"'gqa_t5_test_toy_copy_typo'.*did you mean"):
    _train(tmp_path, fx.tiny_model(2), 2, train_dataset_cfg=cfg)
  assert not os.path.exists(tmp_path / "checkpoints")


def test_model_dir_of_another_configuration_is_refused(tmp_path):
  _train(tmp_path, fx.tiny_model(2), 1)
  with pytest.raises(ValueError, match=r"different model configuration \(num_kv_heads: 2 .* "
                                       r"vs 1 configured\)"):
    _train(tmp_path, fx.tiny_model(1), 2)
  # Dropout does not change the parameters: resuming with another rate is allowed.
  state = _train(tmp_path, fx.tiny_model(2, dropout_rate=0.1), 2)
  assert int(state.step) == 2


def test_initial_checkpoint_with_other_shapes_names_tensor_and_shapes(tmp_path):
  source_dir = tmp_path / "mha"
  _train(source_dir, fx.tiny_model(4), 1)
  with pytest.raises(initial_checkpoint.InitialCheckpointError,
                     match=r"tensor decoder/layers_0/encoder_decoder_attention/key/kernel has "
                           r"shape \(32, 32\) in the checkpoint but the configured model needs "
                           r"\(32, 8\)"):
    _train(tmp_path / "mqa", fx.tiny_model(1), 2, initial_checkpoint_path=str(source_dir))
  assert not os.path.exists(tmp_path / "mqa" / "checkpoints" / "2")


def test_uptraining_from_a_multi_head_run_with_mean_pooling(tmp_path):
  source_dir = tmp_path / "mha"
  mha_state = _train(source_dir, fx.tiny_model(4), 2)
  state = _train(tmp_path / "gqa", fx.tiny_model(2), 3, initial_checkpoint_path=str(source_dir),
                 kv_conversion="mean")
  # The step continues from the checkpoint's (T5X's convention): 2 -> 3 is one step.
  assert int(state.step) == 3
  # The encoder started from the checkpoint: one Adafactor step (lr 0.05 * RMS) away from it.
  before = np.asarray(mha_state.params["encoder"]["layers_0"]["mlp"]["wo"]["kernel"])
  after = np.asarray(state.params["encoder"]["layers_0"]["mlp"]["wo"]["kernel"])
  rms = np.sqrt(np.mean(before ** 2))
  assert np.sqrt(np.mean((after - before) ** 2)) <= 0.05 * rms * 1.01


def test_fine_tuning_starts_from_a_t5x_checkpoint(tmp_path):
  from gqa_t5 import models
  from gqa_t5.model import network
  config = tiny_config("t5x_fixture", dropout_rate=0.0)
  model = models.EncoderDecoderModel(network.Transformer(config))
  # The fixture's 1,152-row embedding needs a task vocabulary of 1,025..1,152 ids.
  task = fx.register_toy_task("gqa_t5_test_toy_copy_1152", extra_ids=1152 - 259)
  state = _train(tmp_path, model, 21, train_dataset_cfg=fx.dataset_cfg(task=task, module=None),
                 initial_checkpoint_path=os.path.join(FIXTURE, "checkpoint_f32", "checkpoint_20"))
  assert int(state.step) == 21
  assert model_dir_lib.Checkpointer(str(tmp_path)).latest_step() == 21


def test_scanned_layers_keep_per_layer_optimizer_statistics():
  # T5X's scan_layers layout: kernels [in, layers, out]; Adafactor factors within each layer.
  trainer, _ = _trainer(fx.tiny_model(2, scan_layers=True))
  stats = trainer.abstract_state.opt_state.stats["decoder"]["layers"]["mlp"]
  assert trainer.params_axes["decoder"]["layers"]["mlp"]["wi_0"]["kernel"] == (
      "embed", "layers", "mlp")
  assert stats["wi_0"]["kernel"]["v_row"].shape == (32, 2)   # [embed, layers]
  assert stats["wi_0"]["kernel"]["v_col"].shape == (2, 64)   # [layers, mlp]
  axes = trainer.state_axes.opt_state.stats["decoder"]["layers"]["mlp"]["wo"]["kernel"]
  assert axes == {"v_row": ("layers", "embed"), "v_col": ("mlp", "layers")}


def test_initial_checkpoint_missing_a_parameter_is_refused_unless_allowed(tmp_path, caplog):
  from gqa_t5.checkpoints import t5x_legacy
  from gqa_t5.checkpoints import tree as tree_lib
  state = _train(tmp_path / "source", fx.tiny_model(2), 1)
  flat = tree_lib.flatten(jax.device_get(state.params))
  leaf = "encoder/layers_1/pre_mlp_layer_norm/scale"
  shape = flat.pop(leaf).shape
  partial = tmp_path / "partial"
  t5x_legacy.save_t5x(str(partial), tree_lib.unflatten(flat), step=1)
  with pytest.raises(initial_checkpoint.InitialCheckpointError,
                     match=rf"tensor {leaf} \({shape[0]},\) is missing from the checkpoint.*"
                           r"leave 1 parameter\(s\) freshly initialised.*"
                           r"train.allow_fresh_params = True"):
    _train(tmp_path / "refused", fx.tiny_model(2), 2, initial_checkpoint_path=str(partial))
  assert not os.path.exists(tmp_path / "refused" / "checkpoints" / "2")
  # Opting in trains, and the warning names the parameter that starts from random values.
  with caplog.at_level("WARNING"):
    allowed = _train(tmp_path / "allowed", fx.tiny_model(2), 2,
                     initial_checkpoint_path=str(partial), allow_fresh_params=True)
  assert int(allowed.step) == 2
  assert any(leaf in r.getMessage() and "allow_fresh_params" in r.getMessage()
             for r in caplog.records)
