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
  --coordinator_address / --num_processes / --process_id   multi-process runs
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Any, Callable, Dict, Optional, Sequence

import jax
import numpy as np

from gqa_t5 import evaluation
from gqa_t5 import gin_utils
from gqa_t5 import input_pipeline
from gqa_t5 import metrics_writer
from gqa_t5 import optim
from gqa_t5 import partitioning as partitioning_lib
from gqa_t5 import trainer as trainer_lib
from gqa_t5.checkpoints import initial as initial_lib
from gqa_t5.checkpoints import model_dir as model_dir_lib


def _model_config(model):
  return getattr(model.module, "config", None)


def _format_bytes(n: float) -> str:
  for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
    if abs(n) < 1024 or unit == "TiB":
      return f"{n:.2f} {unit}"
    n /= 1024.0
  return f"{n:.2f} TiB"


def dry_run_report(trainer: trainer_lib.Trainer) -> Dict[str, float]:
  """Compiles the train step abstractly; returns and prints per-device memory figures."""
  t0 = time.perf_counter()
  compiled = trainer.compile_train_step()
  seconds = time.perf_counter() - t0
  state = trainer.state_bytes_per_device()
  report = {"compile_seconds": seconds, "params_bytes_per_device": state["params"],
            "optimizer_bytes_per_device": state["optimizer"]}
  analysis = None
  try:
    analysis = compiled.memory_analysis()
  except Exception:  # pylint: disable=broad-except  # not every backend reports it
    pass
  if analysis is not None:
    args = float(analysis.argument_size_in_bytes)
    out = float(analysis.output_size_in_bytes)
    alias = float(getattr(analysis, "alias_size_in_bytes", 0))
    temp = float(analysis.temp_size_in_bytes)
    report.update(argument_bytes=args, output_bytes=out, alias_bytes=alias, temp_bytes=temp,
                  peak_bytes_per_device=args + out - alias + temp)
  data, model = trainer.partitioner.mesh_shape
  lines = [f"dry run: mesh (data={data}, model={model}) on {jax.device_count()} "
           f"{jax.devices()[0].platform} devices; compiled in {seconds:.1f}s",
           f"  parameters per device:       {_format_bytes(state['params'])}",
           f"  optimizer state per device:  {_format_bytes(state['optimizer'])}"]
  if analysis is not None:
    lines += [f"  step arguments per device:   {_format_bytes(report['argument_bytes'])}",
              f"  temporaries per device:      {_format_bytes(report['temp_bytes'])}",
              f"  estimated peak per device:   {_format_bytes(report['peak_bytes_per_device'])}"
              " (the compiler's figure for this backend; TPU/GPU layouts differ somewhat)"]
  print("\n".join(lines), flush=True)
  return report


def train(*, model, train_dataset_cfg: input_pipeline.DatasetConfig, model_dir: str,
          total_steps: int, optimizer: Optional[optim.Adafactor] = None,
          partitioner: Optional[partitioning_lib.Partitioner] = None,
          train_eval_dataset_cfg: Optional[input_pipeline.DatasetConfig] = None,
          infer_eval_dataset_cfg: Optional[input_pipeline.DatasetConfig] = None,
          checkpoint_cfg: model_dir_lib.CheckpointConfig = model_dir_lib.CheckpointConfig(),
          initial_checkpoint_path: Optional[str] = None,
          kv_conversion: Optional[str] = None,
          eval_period: int = 1000, eval_steps: Optional[int] = 20, log_period: int = 100,
          infer_eval_num_examples: Optional[int] = None,
          decoding: evaluation.DecodingConfig = evaluation.DecodingConfig(),
          num_microbatches: Optional[int] = None, random_seed: int = 0,
          dry_run: bool = False, progress: bool = True,
          stop_after_steps: Optional[int] = None,
          on_start: Optional[Callable[[], None]] = None) -> Optional[Any]:
  """Trains `model`; returns the final TrainState (None for a dry run).

  kv_conversion: how to turn a multi-head initial checkpoint into this model's key/value
    heads ('mean': the paper's mean pooling; 'first': keep the first head of each group;
    None: shapes must match exactly).
  stop_after_steps: stop (after checkpointing) once this many steps ran in this process,
    e.g. to split a long run into jobs.
  on_start: called once the checks passed, before any compute (the entry point writes the
    operative gin config there).
  """
  optimizer = optimizer or optim.Adafactor(learning_rate=optim.rsqrt_decay())
  partitioner = partitioner or partitioning_lib.Partitioner()
  config = _model_config(model)
  process_count = jax.process_count()

  # 1. Checks that cost no compute.
  for cfg in (train_dataset_cfg, train_eval_dataset_cfg, infer_eval_dataset_cfg):
    if cfg is not None:
      # A dry run reads no data: it checks the task name only.
      (input_pipeline.get_task if dry_run else input_pipeline.check_split)(cfg)
  if config is not None:
    layout = partitioning_lib.validate(config, partitioner.mesh_shape,
                                       train_dataset_cfg.batch_size, num_microbatches,
                                       process_count)
    logging.info("%s", layout)
  if total_steps <= 0:
    raise ValueError(f"TRAIN_STEPS must be positive, got {total_steps}")
  checkpointer = None
  if not dry_run:
    if config is not None:
      model_dir_lib.check_model_dir_config(model_dir, config)
    checkpointer = model_dir_lib.Checkpointer(model_dir, checkpoint_cfg)
  resume_step = checkpointer.latest_step() if checkpointer else None
  initial = None
  if resume_step is None and initial_checkpoint_path and not dry_run:
    initial = initial_lib.open_for_model(initial_checkpoint_path, config, kv_conversion)

  batch_spec = input_pipeline.model_feature_spec(train_dataset_cfg)
  trainer = trainer_lib.Trainer(model, optimizer, partitioner, batch_spec, num_microbatches,
                                random_seed)
  if initial is not None:
    initial_lib.check_against(initial, trainer.abstract_params)
  if on_start is not None:
    on_start()
  if dry_run:
    dry_run_report(trainer)
    return None

  # 2. Restore.
  batches = input_pipeline.TrainBatches(train_dataset_cfg, jax.process_index(), process_count)
  _check_batch_spec(batches, batch_spec, process_count)
  if resume_step is not None:
    state, data_state = checkpointer.restore(trainer.abstract_state, resume_step)
    _check_data_state(data_state, batches, model_dir)
    batches.restore(int(data_state.get("position", 0)))
    logging.info("resumed from %s at step %d", checkpointer.directory, resume_step)
  elif initial is not None:
    params = initial_lib.read_params(initial, trainer.abstract_params)
    state = trainer.state_from_params(params, step=initial.step)
    logging.info("initialised from %s (step %d)", initial_checkpoint_path, initial.step)
  else:
    state = trainer.init_state()
  start_step = int(jax.device_get(state.step))
  writer = metrics_writer.MetricsWriter(model_dir)
  if start_step >= total_steps:
    logging.info("step %d already reaches TRAIN_STEPS=%d: nothing to train", start_step,
                 total_steps)
    checkpointer.close()
    writer.close()
    return state

  # 3. Loop. A step's metrics are read one step later so the host never stalls the device;
  #    the NaN check therefore stops the run at most one step after the bad one.
  last_step = total_steps
  if stop_after_steps is not None:
    last_step = min(total_steps, start_step + stop_after_steps)
  bar = metrics_writer.Progress(start_step, last_step, enabled=progress)
  tokens_per_batch = float(sum(np.prod(s) for k, (s, _) in batch_spec.items()
                               if k in ("encoder_input_tokens", "decoder_target_tokens")))
  lnf = getattr(model, "loss_normalizing_factor", None)
  evaluate = evaluation.TrainingEvaluations(trainer, partitioner, train_eval_dataset_cfg,
                                            infer_eval_dataset_cfg, eval_steps,
                                            infer_eval_num_examples, decoding, writer, model_dir)
  pending = None  # (step, metrics on device)
  window = None
  try:
    step = start_step
    while step < last_step:
      host_batch = next(batches)
      state, metrics = trainer.train_step(state, trainer.shard_batch(host_batch))
      if pending is not None:
        window = _consume(pending, window, bar, tokens_per_batch)
      pending = (step, metrics)
      step += 1
      data_state = batches.state()
      if (log_period and step % log_period == 0) or step == last_step:
        window = _consume(pending, window, bar, tokens_per_batch)
        pending = None
        writer.write(step, {**trainer_lib.summarize(window, lnf), **bar.update(step, 0.0)},
                     "train")
        window = None
      if (checkpoint_cfg.period and step % checkpoint_cfg.period == 0) or step == last_step:
        if pending is not None:
          window = _consume(pending, window, bar, tokens_per_batch)
          pending = None
        checkpointer.save(state, data_state)
      if eval_period and (step % eval_period == 0 or step == last_step):
        for split, metrics in evaluate(state, step).items():
          logging.info("step %d %s %s", step, split, metrics)
    if pending is not None:
      _consume(pending, window, bar, tokens_per_batch)
  finally:
    bar.close()
    if checkpointer is not None:
      checkpointer.close()
    writer.close()
  return state


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


def _consume(pending, window, bar, tokens_per_batch):
  step, metrics = pending
  host = jax.device_get(metrics)
  trainer_lib.check_finite(host, step + 1)
  bar.update(step + 1, tokens_per_batch, float(np.asarray(host["loss"])))
  return trainer_lib.add_metrics(window, host)


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
  parser.add_argument("--no_progress", action="store_true", help="no progress bar")


def _call(fn, args) -> None:
  dry = args.dry_run or bool(args.dry_run_devices)
  model_dir = gin_utils.macro_value("MODEL_DIR")
  fn(dry_run=dry, progress=not args.no_progress,
     on_start=lambda: gin_utils.write_operative_config(None if dry else model_dir))


def main(argv: Optional[Sequence[str]] = None) -> int:
  return gin_utils.run_entry_point(argv, "gqa_t5.train", "gqa_t5.train.train",
                                   "train, uptrain or fine-tune a model from gin files "
                                   "(gin configures gqa_t5.train.train)", _add_flags, _call)


if __name__ == "__main__":
  sys.exit(main())
