"""Training inside a stage's work directory, on `train.train` (checkpointed and resumable):
the pretrain, uptrain and finetune stages' runs, the figures their results record from the run's
metrics.jsonl, and continuing a finished run (a larger alpha's uptraining)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, Dict, Mapping, Optional

from gqa_t5 import input_pipeline
from gqa_t5 import optim
from gqa_t5 import partitioning
from gqa_t5 import train as train_lib
from gqa_t5.checkpoints import model_dir as model_dir_lib
from gqa_t5.reproduce.pipeline import variants
from gqa_t5.reproduce.pipeline.stage_table import MODEL_DIR


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
      model=variants.make_model(config, vocabulary), train_dataset_cfg=dataset,
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
