"""The reproduction's training, conversion and evaluation steps, on the project's own APIs:
`train.train` (checkpointed and resumable), `convert.converter.convert` and
`evaluation.inference_eval`. Each function works inside a stage's work directory.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, Dict, Mapping, Optional

import jax

from gqa_t5 import evaluation
from gqa_t5 import input_pipeline
from gqa_t5 import models
from gqa_t5 import optim
from gqa_t5 import partitioning
from gqa_t5 import train as train_lib
from gqa_t5 import initial_checkpoint
from gqa_t5.checkpoints import model_dir as model_dir_lib
from gqa_t5.convert import converter
from gqa_t5.model import network
from gqa_t5.model.config import T5Config
from gqa_t5.reproduce.pipeline import variants

MODEL_DIR = "model"
CHECKPOINT_DIR = "checkpoint"


def variant_config(base: T5Config, vocab_size: int, kv_heads: Optional[int],
                   dropout_rate: float = 0.0) -> T5Config:
  """`base` with the run's vocabulary, K key/value heads (None or N: MHA) and dropout."""
  k = None if kv_heads in (None, base.num_heads) else kv_heads
  return base.replace(vocab_size=vocab_size, num_kv_heads=k, num_cross_kv_heads=None,
                      dropout_rate=dropout_rate)


def make_model(config, vocabulary=None):
  # T5.1.1's z-loss (gin/t5_1_1/base.gin); the class defaults to t5x's 0.0.
  return models.EncoderDecoderModel(network.Transformer(config), input_vocabulary=vocabulary,
                                    output_vocabulary=vocabulary, z_loss=1e-4)


def check_equal_depths(config: T5Config) -> T5Config:
  """A checkpoint's inferred T5Config, if its stacks are equally deep (the presets' shape)."""
  if config.num_encoder_layers != config.num_decoder_layers:
    raise ValueError(f"the reproduction needs equal encoder and decoder depths; the checkpoint "
                     f"has {config.num_encoder_layers} and {config.num_decoder_layers}")
  return config


def take_initial_checkpoint(path: str, vocabulary) -> Dict[str, Any]:
  """The pretrain stage's result for --initial-checkpoint: a multi-head checkpoint of equal
  stack depths whose vocabulary covers the demo vocabulary (nothing is copied)."""
  source = initial_checkpoint.open_for_model(path, None)
  config = check_equal_depths(source.config)
  if config.self_attention_kv_heads != config.num_heads:
    raise ValueError(f"--initial-checkpoint {path} has {config.self_attention_kv_heads} "
                     f"key/value heads for {config.num_heads} query heads: the "
                     f"reproduction starts from a multi-head checkpoint")
  if config.vocab_size < int(vocabulary.vocab_size):
    raise ValueError(f"--initial-checkpoint {path} has vocab_size {config.vocab_size}, "
                     f"smaller than the demo vocabulary's {vocabulary.vocab_size}")
  return {"checkpoint": path, "step": int(source.step), "vocab_size": config.vocab_size,
          "model": variants.config_dict(config)}


def latest_metrics(model_dir: Path, split: str = "train") -> Dict[str, Any]:
  """The last record of `split` in MODEL_DIR/metrics.jsonl (empty when none)."""
  path = Path(model_dir) / "metrics.jsonl"
  last: Dict[str, Any] = {}
  if path.exists():
    with open(path) as f:
      for line in f:
        try:
          record = json.loads(line)
        except ValueError:
          continue  # a line cut short by a kill
        if record.get("split") == split:
          last = record
  return last


def train(work: Path, *, config, vocabulary, task: str, feature_lengths: Mapping[str, int],
          batch_size: int, total_steps: int, learning_rate,
          initial_checkpoint: Optional[str] = None, seed: int = 0,
          checkpoint_period: int = 200, progress: bool = True,
          start_step: Optional[int] = None) -> Dict[str, Any]:
  """Trains in `work/model` (resuming from its checkpoints) up to `total_steps`.

  learning_rate: a float or an `optim` schedule of the global step. Starting from
  `initial_checkpoint` the optimizer state is fresh (a conversion changes the key/value shapes),
  so Adafactor's second-moment decay restarts there while the schedule continues.
  start_step: the step training starts from (0 from scratch): then the result also has the
  steady throughput with the compile left out (`steady_tokens_per_second`).
  """
  model_dir = work / MODEL_DIR
  dataset = input_pipeline.DatasetConfig(
      mixture_or_task_name=task, task_feature_lengths=dict(feature_lengths), split="train",
      batch_size=batch_size, shuffle=True, seed=seed, pack=True)
  optimizer = optim.Adafactor(learning_rate=learning_rate)
  train_lib.train(
      model=make_model(config, vocabulary), train_dataset_cfg=dataset,
      model_dir=str(model_dir), total_steps=total_steps, optimizer=optimizer,
      partitioner=partitioning.Partitioner(),
      checkpoint_cfg=model_dir_lib.CheckpointConfig(period=checkpoint_period, keep=1,
                                                    async_save=False),
      initial_checkpoint_path=initial_checkpoint, eval_period=0,
      log_period=max(1, min(50, total_steps // 4 or 1)), random_seed=seed, progress=progress)
  metrics = latest_metrics(model_dir)
  out = {"model_dir": MODEL_DIR, "step": total_steps}
  for name in ("loss_per_nonpadding_target_token", "accuracy", "tokens_per_second"):
    if name in metrics:
      out[name] = metrics[name]
  if start_step is not None:
    steady = steady_tokens_per_second(
        model_dir, batch_size * (feature_lengths["inputs"] + feature_lengths["targets"]),
        start_step)
    if steady is not None:
      out["steady_tokens_per_second"] = steady
  return out


def steady_tokens_per_second(model_dir: Path, tokens_per_step: int,
                             start_step: int) -> Optional[float]:
  """Tokens/s between the first and the last logged step of a run that began at `start_step`.

  The logged `tokens_per_second` averages from the loop's start, so it includes compiling the
  first step: record i was written after (step_i - start_step) x tokens_per_step tokens in
  that many tokens / rate_i seconds, and the difference of two records leaves the compile out.
  None with fewer than two records (or a log that restarted, as a resumed run's does)."""
  path = Path(model_dir) / "metrics.jsonl"
  records = []
  for line in path.read_text().splitlines() if path.exists() else []:
    try:
      record = json.loads(line)
    except ValueError:
      continue
    if record.get("split") == "train" and record.get("tokens_per_second"):
      records.append(record)
  steps = [r["step"] for r in records]
  if len(records) < 2 or steps != sorted(set(steps)):
    return None
  elapsed = [(r["step"] - start_step) * tokens_per_step / r["tokens_per_second"]
             for r in (records[0], records[-1])]
  seconds = elapsed[1] - elapsed[0]
  return (steps[-1] - steps[0]) * tokens_per_step / seconds if seconds > 0 else None


def copy_model_dir(source: Path, work: Path) -> None:
  """Starts `work/model` as a copy of a finished training's MODEL_DIR (to continue it)."""
  target = work / MODEL_DIR
  if target.exists():
    return  # an earlier attempt already copied it (and may have trained further)
  tmp = work / (MODEL_DIR + ".copying")
  shutil.rmtree(tmp, ignore_errors=True)
  shutil.copytree(source, tmp)
  os.replace(tmp, target)


def convert(work: Path, source: str, kv_heads: int, method: str, seed: int = 0
            ) -> Dict[str, Any]:
  """Converts the multi-head checkpoint `source` into `work/checkpoint` (T5X format)."""
  spec = converter.ConversionSpec(num_kv_heads=kv_heads, method=method, seed=seed)
  record = converter.convert(initial_checkpoint.resolve_path(source),
                             str(work / CHECKPOINT_DIR), spec, output_format="t5x",
                             overwrite=True)
  return {"checkpoint": CHECKPOINT_DIR, "step": int(record["source_step"]),
          "changed_tensors": len(record["changed_tensors"])}


def _load(config, vocabulary, checkpoint: str):
  """(model, partitioner, device parameters, step) of a checkpoint of `config`'s shapes."""
  model = make_model(config, vocabulary)
  partitioner = partitioning.Partitioner()
  abstract, axes = partitioning.abstract_params_and_axes(model)
  partitioner.setup_for(config)
  params, step = initial_checkpoint.load_for_model(checkpoint, config, abstract,
                                                   partitioner.shardings(axes))
  return model, partitioner, params, step


def _cross_entropy(model, params, cfg, num_batches: int) -> float:
  """Teacher-forced cross-entropy per target token (z-loss excluded) over `num_batches`
  batches of `cfg`'s split (the last one zero-padded; padding rows weigh nothing)."""
  loss_fn = jax.jit(lambda p, b: model.loss_fn(p, b, None)[1])
  total, tokens = 0.0, 0.0
  dataset = input_pipeline.get_dataset(cfg, num_epochs=1, drop_remainder=False)
  for batch in dataset.take(num_batches).as_numpy_iterator():
    m = jax.device_get(loss_fn(params, input_pipeline.pad_batch(batch, cfg.batch_size)))
    total += float(m["loss"]) - float(m["z_loss"])
    tokens += float(m["weight_sum"])
  return total / max(tokens, 1.0)


def objective_loss(*, config, vocabulary, checkpoint: str, task: str,
                   feature_lengths: Mapping[str, int], batch_size: int, num_batches: int,
                   split: str = "validation") -> Dict[str, float]:
  """A checkpoint's loss on the pretraining objective's held-out split, before any
  fine-tuning: what conversion damages and uptraining repairs, free of fine-tuning noise."""
  model, _, params, step = _load(config, vocabulary, checkpoint)
  cfg = input_pipeline.DatasetConfig(
      mixture_or_task_name=task, task_feature_lengths=dict(feature_lengths), split=split,
      batch_size=batch_size, shuffle=False, seed=42, pack=True)
  return {"loss": _cross_entropy(model, params, cfg, num_batches), "step": int(step)}


def evaluate(work: Path, *, config, vocabulary, checkpoint: str, tasks: Mapping[str, int],
             inputs_length: int, num_examples: int, batch_size: int,
             split: str = "test") -> Dict[str, Dict[str, float]]:
  """Greedy decoding of `num_examples` of each task's split, scored with the task's metrics,
  plus the teacher-forced loss of the same examples; {task: {metric: value}}."""
  model, partitioner, params, step = _load(config, vocabulary, checkpoint)
  scores: Dict[str, Dict[str, float]] = {}
  for task, targets_length in tasks.items():
    cfg = input_pipeline.DatasetConfig(
        mixture_or_task_name=task,
        task_feature_lengths={"inputs": inputs_length, "targets": targets_length},
        split=split, batch_size=batch_size, shuffle=False, seed=42, pack=False)
    metrics = evaluation.inference_eval(
        model, partitioner, params, cfg, step, evaluation.DecodingConfig(method="greedy"),
        num_examples=num_examples, log_dir=str(work / "predictions"))
    prefix = task + "/"
    scores[task] = {k[len(prefix):]: float(v) for k, v in metrics.items()
                    if k.startswith(prefix)}
    # A far less noisy measure than decoded-text metrics on a few examples.
    scores[task]["loss"] = _cross_entropy(model, params, cfg, -(-num_examples // batch_size))
  return scores
