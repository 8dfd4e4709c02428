"""`python -m gqa_t5.train --gin_file=... --gin.MODEL_DIR=...`: the training run gin configures
(`gqa_t5.train.train`, T5X's train.py: checks, restore, loop, evaluation, checkpoints) and `main`.

Order of business, so that bad input costs nothing:
  1. check task names and splits, the mesh against the model and batch, MODEL_DIR's recorded
     configuration, and the initial checkpoint's tensor shapes (metadata only);
  2. restore: the latest checkpoint in MODEL_DIR, else INITIAL_CHECKPOINT_PATH (parameters;
     the optimizer state starts fresh), else random initialisation;
  3. train to `total_steps` (T5X convention: the count includes a pre-trained checkpoint's
     steps), evaluating every `eval_period` steps and checkpointing every `checkpoint.period`.
Extra flags of `main`:
  --dry_run               check everything and compile the step from shapes alone, print the
                          per-device memory estimate, and exit
  --dry_run_devices=N     simulate N CPU devices for the dry run (e.g. a pod slice's mesh)
  --dry_run_tpu=SLICE     compile the step for a TPU v4 slice (e.g. v4-256) with TPU's own
                          compiler (the `tpu` extra), print each chip's memory and fail when
                          it does not fit, naming what would make it fit
  --coordinator_address / --num_processes / --process_id   multi-process runs
"""

from __future__ import annotations

import dataclasses
import logging
import sys
from typing import Any, Callable, Dict, Mapping, Optional, Sequence

import jax
import numpy as np

from gqa_t5 import evaluation
from gqa_t5 import entry_point
from gqa_t5 import gin_utils
from gqa_t5 import initial_checkpoint as initial_lib
from gqa_t5 import input_pipeline
from gqa_t5 import metrics_writer
from gqa_t5 import optim
from gqa_t5 import schedules
from gqa_t5 import partitioning as partitioning_lib
from gqa_t5 import prediction
from gqa_t5 import tpu_topology
from gqa_t5 import trainer as trainer_lib
from gqa_t5.checkpoints import model_dir as model_dir_lib


def train(*, model, train_dataset_cfg: input_pipeline.DatasetConfig, model_dir: str,
          total_steps: int, optimizer: Optional[optim.Adafactor] = None,
          partitioner: Optional[partitioning_lib.Partitioner] = None,
          train_eval_dataset_cfg: Optional[input_pipeline.DatasetConfig] = None,
          infer_eval_dataset_cfg: Optional[input_pipeline.DatasetConfig] = None,
          checkpoint_cfg: model_dir_lib.CheckpointConfig = model_dir_lib.CheckpointConfig(),
          initial_checkpoint_path: Optional[str] = None,
          kv_conversion: Optional[str] = None,
          allow_fresh_params: bool = False,
          eval_period: int = 1000, eval_steps: Optional[int] = 20, log_period: int = 100,
          infer_eval_num_examples: Optional[int] = None,
          decoding: prediction.DecodingConfig = prediction.DecodingConfig(),
          num_microbatches: Optional[int] = None, random_seed: int = 0,
          dry_run: bool = False, dry_run_tpu: Optional[str] = None, progress: bool = True,
          stop_after_steps: Optional[int] = None,
          on_start: Optional[Callable[[], None]] = None) -> Optional[Any]:
  """Trains `model`; returns the final TrainState (None for a dry run).

  kv_conversion: how to turn a multi-head initial checkpoint into this model's key/value
    heads ('mean': the paper's mean pooling; 'first': keep the first head of each group;
    None: shapes must match exactly).
  allow_fresh_params: start the parameters that the initial checkpoint lacks (or holds at
    another shape) from random values, naming them in a warning. Off: such a checkpoint is
    refused with every such parameter named, before any compute.
  stop_after_steps: stop (after checkpointing) once this many steps ran in this process,
    e.g. to split a long run into jobs.
  on_start: called once the checks passed, before any compute (the entry point writes the
    operative gin config there).
  dry_run_tpu: a TPU v4 slice ('v4-256') to compile the dry run's step for, on this machine.
  """
  optimizer = optimizer or optim.Adafactor(learning_rate=schedules.rsqrt_decay())
  partitioner = partitioner or partitioning_lib.Partitioner()
  tpu_slice = None
  if dry_run_tpu:
    dry_run, tpu_slice = True, tpu_topology.get_slice(dry_run_tpu)
    partitioner = dataclasses.replace(partitioner,
                                      devices=tpu_topology.slice_devices(tpu_slice.name))
  config = getattr(model.module, "config", None)
  process_count = jax.process_count()

  # 1. Checks that cost no compute.
  _check_settings(total_steps, checkpoint_cfg, (train_dataset_cfg, train_eval_dataset_cfg,
                                                infer_eval_dataset_cfg),
                  eval_period=eval_period, log_period=log_period, eval_steps=eval_steps,
                  stop_after_steps=stop_after_steps)
  _check_datasets((train_dataset_cfg, train_eval_dataset_cfg, infer_eval_dataset_cfg), config,
                  dry_run)
  if config is not None:
    logging.info("%s", partitioning_lib.validate(config, partitioner.mesh_shape,
                                                 train_dataset_cfg.batch_size,
                                                 num_microbatches, process_count))
  # Read-only checks of MODEL_DIR: nothing is written there before every check passed.
  resume_step, initial = _inspect_model_dir(model_dir, config, initial_checkpoint_path,
                                            kv_conversion, dry_run)
  batch_spec = input_pipeline.model_feature_spec(train_dataset_cfg)
  trainer = trainer_lib.Trainer(model, optimizer, partitioner, batch_spec, num_microbatches,
                                random_seed)
  fresh = []
  if initial is not None:
    fresh = initial_lib.check_against(initial, trainer.abstract_params, allow_fresh_params)
  if dry_run:
    if on_start is not None:
      on_start()
    trainer_lib.dry_run_report(trainer, tpu_slice.hbm_bytes if tpu_slice else None,
                               what=f"the train step on {tpu_slice.name}" if tpu_slice
                               else "the train step")
    return None

  # 2. Restore. From here on MODEL_DIR is ours (its lock), and everything opened is closed on
  # every path.
  with model_dir_lib.ModelDirLock(model_dir):
    if config is not None:
      model_dir_lib.check_model_dir_config(model_dir, config)
    checkpointer = model_dir_lib.Checkpointer(model_dir, checkpoint_cfg)
    try:
      if on_start is not None:
        on_start()
      batches = input_pipeline.TrainBatches(train_dataset_cfg, jax.process_index(),
                                            process_count)
      _check_batch_spec(batches, batch_spec, process_count)
      state = _restore(trainer, checkpointer, resume_step, initial, batches, model_dir, fresh)
      writer = metrics_writer.MetricsWriter(model_dir)
      evaluate = evaluation.TrainingEvaluations(trainer, partitioner, train_eval_dataset_cfg,
                                                infer_eval_dataset_cfg, eval_steps,
                                                infer_eval_num_examples, decoding, writer,
                                                model_dir)
      # 3. Loop.
      loop = _Loop(trainer, batches, checkpointer, writer, evaluate,
                   periods=(log_period, checkpoint_cfg.period, eval_period),
                   save_on_preemption=checkpoint_cfg.save_on_preemption)
      return loop.run_to(state, total_steps, stop_after_steps, progress)
    finally:
      checkpointer.close()  # a no-op once the loop closed it


# Where each setting comes from in the gin files: an error names the macro a user sets.
_SETTING_NAMES = {"total_steps": "TRAIN_STEPS", "eval_period": "EVAL_PERIOD",
                  "log_period": "LOG_PERIOD", "eval_steps": "EVAL_STEPS",
                  "stop_after_steps": "train.train.stop_after_steps"}


def _check_int(label: str, value, minimum: int, optional: bool = False) -> None:
  if optional and value is None:
    return
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
    raise ValueError(f"{label} must be an integer, got {value!r} ({type(value).__name__}); in "
                     "gin, write the number without quotes (e.g. --gin.TRAIN_STEPS=10)")
  if value < minimum:
    raise ValueError(f"{label} must be at least {minimum}, got {value}")


def _check_settings(total_steps, checkpoint_cfg, dataset_cfgs, **periods) -> None:
  """Gin values of the wrong type or range are refused here, naming the setting, rather than
  failing deep inside the partitioner or the loop."""
  _check_int("TRAIN_STEPS (train.train.total_steps)", total_steps, 1)
  for name, value in periods.items():
    _check_int(f"{_SETTING_NAMES[name]} (train.train.{name})", value,
               1 if name == "stop_after_steps" else 0,
               optional=name in ("eval_steps", "stop_after_steps"))
  _check_int("CHECKPOINT_PERIOD (model_dir.CheckpointConfig.period)", checkpoint_cfg.period, 0)
  _check_int("CHECKPOINTS_TO_KEEP (model_dir.CheckpointConfig.keep)", checkpoint_cfg.keep, 1,
             optional=True)
  for cfg in dataset_cfgs:
    if cfg is None:
      continue
    where = f"input_pipeline.DatasetConfig of split {cfg.split!r}"
    _check_int(f"BATCH_SIZE ({where}: batch_size)", cfg.batch_size, 1)
    lengths = cfg.task_feature_lengths
    if lengths is not None and not isinstance(lengths, Mapping):
      raise ValueError(f"TASK_FEATURE_LENGTHS ({where}) must be a dict of feature lengths, "
                       f"got {lengths!r}")
    for feature, length in (lengths or {}).items():
      _check_int(f"TASK_FEATURE_LENGTHS[{feature!r}] ({where})", length, 1)


def _check_datasets(cfgs, config, dry_run: bool) -> None:
  """Task names and splits exist (a dry run reads no data: it checks names only), and the
  model's vocabulary size fits every task's vocabulary."""
  for cfg in cfgs:
    if cfg is None:
      continue
    (input_pipeline.get_task if dry_run else input_pipeline.check_split)(cfg)
    if config is not None:
      input_pipeline.check_vocab_size(cfg, config.vocab_size)


def _inspect_model_dir(model_dir, config, initial_checkpoint_path, kv_conversion,
                       dry_run: bool):
  """(latest checkpoint step, initial checkpoint opened lazily), reading MODEL_DIR only: its
  recorded model configuration must match `config`. Both None for a dry run."""
  if dry_run:
    return None, None
  if config is not None:
    model_dir_lib.check_model_dir_config(model_dir, config, write=False)
  steps = model_dir_lib.checkpoint_steps(model_dir)
  resume_step = steps[-1] if steps else None
  initial = None
  if resume_step is None and initial_checkpoint_path:
    initial = initial_lib.open_for_model(initial_checkpoint_path, config, kv_conversion)
  return resume_step, initial


def _restore(trainer, checkpointer, resume_step, initial, batches, model_dir, fresh=()):
  """The first state: MODEL_DIR's latest checkpoint (and the input stream's position there),
  else the initial checkpoint's parameters with a fresh optimizer state (and random values
  for the `fresh` parameters it lacks, when allowed), else random."""
  if resume_step is not None:
    state, data_state = checkpointer.restore(trainer.abstract_state, resume_step)
    _check_data_state(data_state, batches, model_dir)
    batches.restore(int(data_state.get("position", 0)))
    # One line naming the checkpoint: the progress bar alone starts at "step 7/9".
    logging.info("resumed from the checkpoint %s (step %d)",
                 checkpointer.step_dir(resume_step), resume_step)
    return state
  if initial is not None:
    params = initial_lib.read_params(initial, trainer.abstract_params, skip=set(fresh))
    if fresh:
      logging.warning("allow_fresh_params: %d parameter(s) not in %s start from random "
                      "values: %s", len(fresh), initial.path, ", ".join(fresh))
      params = initial_lib.merge_fresh(params, jax.device_get(trainer.init_state().params),
                                       fresh)
    logging.info("initialised from %s (step %d)", initial.path, initial.step)
    return trainer.state_from_params(params, step=initial.step)
  return trainer.init_state()


class _Loop:
  """The steps of one run with their logs, checkpoints and evaluations.

  A step's metrics are read one step later so the host never stalls the device; a non-finite
  loss or update therefore stops the run at most one step after the bad one, and always
  before anything computed from it is saved (the state is also checked right before a save).
  A save runs in the background; one that fails (a full disk) stops the run at the next step.
  """

  def __init__(self, trainer, batches, checkpointer, writer, evaluate, periods,
               save_on_preemption: bool = True):
    self.trainer, self.batches, self.checkpointer = trainer, batches, checkpointer
    self.save_on_preemption = save_on_preemption
    self.signals = model_dir_lib.StopSignals()
    self.writer, self.evaluate = writer, evaluate
    self.bar = None
    self.log_period, self.checkpoint_period, self.eval_period = periods
    spec = trainer.batch_spec
    self.tokens_per_batch = float(sum(np.prod(s) for k, (s, _) in spec.items()
                                      if k in ("encoder_input_tokens", "decoder_target_tokens")))
    self.lnf = getattr(trainer.model, "loss_normalizing_factor", None)
    self.pending = None  # (step, metrics on device, the batch's position in the input stream)
    self.window = None   # summed metrics since the last log

  def run_to(self, state, total_steps: int, stop_after_steps: Optional[int], progress: bool):
    """Trains `state` to `total_steps` (or `stop_after_steps` more); closes the checkpointer
    and the writer whatever happens."""
    start_step = int(jax.device_get(state.step))
    last_step = total_steps
    if stop_after_steps is not None:
      last_step = min(total_steps, start_step + stop_after_steps)
    if start_step >= total_steps:
      logging.info("step %d already reaches TRAIN_STEPS=%d: nothing to train", start_step,
                   total_steps)
    self.bar = metrics_writer.Progress(start_step, last_step,
                                       enabled=progress and start_step < last_step)
    try:
      with self.signals:  # SIGTERM/SIGINT: save and stop between steps (see _preempt)
        return self._run(state, start_step, last_step)
    finally:
      self.bar.close()
      self.checkpointer.close()
      self.writer.close()

  def _run(self, state, step: int, last_step: int):
    while step < last_step:
      host_batch = next(self.batches)
      state, metrics = self.trainer.train_step(state, self.trainer.shard_batch(host_batch))
      self.checkpointer.check_background_save(at_step=step + 1)
      self._consume()
      self.pending = (step, metrics, self.batches.position - 1)
      step += 1
      if (self.log_period and step % self.log_period == 0) or step == last_step:
        self._consume()
        rates = self.bar.rates()
        self.writer.write(step, {**metrics_writer.summarize(self.window, self.lnf), **rates},
                          "train")
        self.window = None
      if (self.checkpoint_period and step % self.checkpoint_period == 0) or step == last_step:
        self._save(state, step)
      if self.eval_period and (step % self.eval_period == 0 or step == last_step):
        for split, metrics in self.evaluate(state, step).items():
          self.bar.print(f"step {step} {split}: " + ", ".join(
              f"{k} {v:.4g}" for k, v in sorted(metrics.items())))
      signum = self.signals.requested()
      if signum is not None:
        self._preempt(state, step, signum)
    self._consume()
    return state

  def _preempt(self, state, step: int, signum: int) -> None:
    """Stops on SIGTERM/SIGINT: the save in flight finishes (Orbax joins it before the next
    one), the current step is saved unless `save_on_preemption` is off, and Preempted (exit
    status 128 + signal) is raised once everything is on disk."""
    saved = None
    if self.save_on_preemption:
      self._save(state, step)  # a no-op if this step was just saved periodically
      saved = step
    self.checkpointer.wait()
    raise model_dir_lib.Preempted(signum, step, self.checkpointer.directory, saved)

  def _consume(self) -> None:
    if self.pending is None:
      return
    step, metrics, position = self.pending
    self.pending = None
    host = jax.device_get(metrics)
    loss = float(np.asarray(host["loss"]))
    if not np.isfinite(loss):
      self._stop(f"the loss is {loss}", step + 1, position)
    if not bool(host.get("state_is_finite", True)):
      self._stop("the update made the parameters or the optimizer state non-finite",
                 step + 1, position)
    self.window = metrics_writer.add_metrics(self.window, host)
    self.bar.update(step + 1, self.tokens_per_batch,
                    metrics_writer.summarize(self.window, self.lnf).get("loss"))

  def _save(self, state, step: int) -> None:
    self._consume()
    position = self.batches.position - 1
    if not self.trainer.state_is_finite(state):
      self._stop("the parameters or the optimizer state to save are not finite", step,
                 position)
    self.checkpointer.save(state, self.batches.state())

  def _stop(self, what: str, step: int, position: int) -> None:
    last, skipped = self.checkpointer.last_finite_step(self.trainer.abstract_state)
    where = self.checkpointer.directory
    if last is not None:
      saved = (f"The last checkpoint is step {last} in {where}; reading it back, its "
               f"parameters and optimizer state are all finite.")
    elif skipped:
      saved = f"No checkpoint in {where} holds only finite values."
    else:
      saved = f"No checkpoint was saved in {where}."
    if skipped:
      saved += " Non-finite checkpoints: " + "; ".join(
          f"step {s} ({len(bad)} tensors, e.g. {bad[0]})" for s, bad in sorted(skipped.items()))
    raise trainer_lib.NonFiniteLossError(
        f"{what} at step {step} (train batch {position} of the input stream, counting from "
        f"0): training stopped. {saved} Usual causes: a learning rate too high for this model, "
        f"float16 activations (use bfloat16 or float32), or corrupt input data.")


def _check_batch_spec(batches, batch_spec, process_count: int) -> None:
  """The pipeline's host batches must be the expected rows of the global batch."""
  found = batches.element_spec()
  for name, (shape, _) in batch_spec.items():
    if name not in found:
      raise ValueError(f"the input pipeline gives no feature {name!r} (it gives {sorted(found)})")
    expected = (shape[0] // process_count,) + tuple(shape[1:])
    if tuple(found[name][0]) != expected:
      raise ValueError(f"the input pipeline's {name!r} batches have shape {found[name][0]}, "
                       f"expected {expected}")


def _check_data_state(data_state: Dict[str, Any], batches, model_dir: str) -> None:
  for key in ("task", "batch_size", "num_shards"):
    recorded = data_state.get(key)
    current = batches.state()[key]
    if recorded is not None and recorded != current:
      raise ValueError(
          f"{model_dir} was trained with {key}={recorded!r} but this run has {current!r}: the "
          f"input pipeline cannot resume at the recorded position. Use a new MODEL_DIR.")


def _add_flags(parser) -> None:
  parser.add_argument("--dry_run", action="store_true",
                      help="compile the train step abstractly, print memory per device, exit")
  parser.add_argument("--dry_run_devices", type=int, default=None,
                      help="number of simulated CPU devices for --dry_run")
  parser.add_argument("--dry_run_tpu", default=None, metavar="SLICE",
                      help="compile the step for a TPU v4 slice (e.g. v4-256) with libtpu "
                           "(pip install -e '.[tpu]') and check that it fits each chip")
  parser.add_argument("--no_progress", action="store_true", help="no progress bar")


def _call(fn, args) -> None:
  dry = args.dry_run or bool(args.dry_run_devices) or bool(args.dry_run_tpu)
  model_dir = gin_utils.macro_value("MODEL_DIR")
  fn(dry_run=dry, dry_run_tpu=args.dry_run_tpu, progress=not args.no_progress,
     on_start=lambda: gin_utils.write_operative_config(None if dry else model_dir))


def main(argv: Optional[Sequence[str]] = None) -> int:
  return entry_point.run_entry_point(argv, "gqa_t5.train", "gqa_t5.train.train",
                                   "train, uptrain or fine-tune a model from gin files "
                                   "(gin configures gqa_t5.train.train)", _add_flags, _call)


if __name__ == "__main__":
  sys.exit(main())
