"""The evaluators, in the training loop and shared by the standalone runs (eval.py) and the
reproduction: the teacher-forced loss loop (`teacher_forced_eval`, the one copy) with its
dataset-driven forms (`TeacherForcedEvaluator` on the trainer's sharded step, `dataset_loss` for
a one-off score), and inference evaluation (decoding through `prediction.Predictor`, scored with
the task's metrics by `seqio.Evaluator`).

Every process runs the same evaluation dataset; each contributes its slice of every batch to
the global (data-sharded) array and reads back the gathered predictions, so multi-host
inference needs no extra coordination.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Dict, Iterable, Mapping, Optional

import jax
import numpy as np
from jax.experimental import multihost_utils

from gqa_t5 import input_pipeline
from gqa_t5 import metrics_writer
from gqa_t5 import prediction
from gqa_t5 import trainer as trainer_lib
from gqa_t5.checkpoints import model_dir as model_dir_lib

# Lived here before prediction.py: gin files that say `evaluation.DecodingConfig` keep working
# (the same class, not a copy).
DecodingConfig = prediction.DecodingConfig


def teacher_forced_eval(model, params, batches: Iterable[Mapping[str, Any]],
                        eval_step: Optional[Callable[[Any, Any], Any]] = None
                        ) -> Dict[str, float]:
  """The teacher-forced loss loop: the model's `loss_fn` (losses.py) on every batch, summed,
  then per-token figures (`metrics_writer.summarize`: loss per non-padding target token, accuracy).

  eval_step(params, batch) -> summed metrics; default: the jitted `model.loss_fn` without
  dropout on unsharded batches (what scripts/conversion_quality.py uses).
  """
  if eval_step is None:
    eval_step = jax.jit(lambda p, b: model.loss_fn(p, b, None)[1])
  total = None
  for batch in batches:
    total = metrics_writer.add_metrics(total, jax.device_get(eval_step(params, batch)))
  if total is None:
    raise ValueError("teacher-forced evaluation got no batch")
  return metrics_writer.summarize(total, getattr(model, "loss_normalizing_factor", None))


def dataset_loss(model, params, cfg: input_pipeline.DatasetConfig, num_batches: int) -> float:
  """Teacher-forced cross-entropy per target token (z-loss excluded) over the first
  `num_batches` batches of `cfg`'s split, the last one zero-padded (padding rows weigh
  nothing): a one-off score of a checkpoint on one host, with the jitted `model.loss_fn`."""
  dataset = input_pipeline.get_dataset(cfg, num_epochs=1, drop_remainder=False)
  batches = (input_pipeline.pad_batch(batch, cfg.batch_size)
             for batch in dataset.take(num_batches).as_numpy_iterator())
  return teacher_forced_eval(model, params, batches)["loss"]


class TeacherForcedEvaluator:
  """Loss and token accuracy over up to `num_batches` global batches of `cfg`'s split (the
  dataset is built once and re-read at every evaluation), on the trainer's sharded step."""

  def __init__(self, trainer: trainer_lib.Trainer, cfg: input_pipeline.DatasetConfig,
               num_batches: Optional[int]):
    self.trainer = trainer
    self.cfg = cfg
    ds = input_pipeline.get_dataset(cfg, jax.process_index(), jax.process_count(),
                                    num_epochs=1, drop_remainder=True)
    self.dataset = ds.take(num_batches) if num_batches is not None else ds

  def __call__(self, params) -> Dict[str, float]:
    step = lambda p, b: self.trainer.eval_step(p, self.trainer.shard_batch(b))
    try:
      return teacher_forced_eval(self.trainer.model, params, self.dataset.as_numpy_iterator(),
                                 step)
    except ValueError:
      raise ValueError(f"the {self.cfg.split!r} split of {self.cfg.mixture_or_task_name!r} gave "
                       f"no full batch of {self.cfg.batch_size} examples to evaluate on"
                       ) from None


def _scalar(value) -> Optional[float]:
  value = getattr(value, "value", value)
  try:
    array = np.asarray(value, dtype=np.float64)
  except (TypeError, ValueError):
    return None
  return float(array) if array.size == 1 else None


class InferenceEvaluator:
  """Decodes `cfg`'s split and scores it with the task's metrics (seqio.Evaluator, created
  once: its dataset is cached in memory across evaluations)."""

  def __init__(self, model, partitioner, cfg: input_pipeline.DatasetConfig,
               decoding: prediction.DecodingConfig = prediction.DecodingConfig(),
               num_examples: Optional[int] = None, log_dir: Optional[str] = None):
    import seqio  # pylint: disable=g-import-not-at-top
    input_pipeline.get_task(cfg)  # clear error for unknown names
    loggers = ()
    if log_dir and jax.process_index() == 0:
      os.makedirs(log_dir, exist_ok=True)
      loggers = (seqio.PyLoggingLogger, seqio.JSONLogger)
    self.model, self.partitioner, self.cfg, self.decoding = model, partitioner, cfg, decoding
    self.evaluator = seqio.Evaluator(
        mixture_or_task_name=cfg.mixture_or_task_name,
        feature_converter=input_pipeline.feature_converter(pack=False),
        eval_split=cfg.split, use_cached=cfg.use_cached, seed=cfg.seed,
        sequence_length=cfg.task_feature_lengths, num_examples=num_examples, shuffle=False,
        logger_cls=loggers, log_dir=log_dir, async_compute_metrics=False)

  def __call__(self, params, step: int) -> Dict[str, float]:
    """{'<task>/<metric>': value}."""
    predictor = prediction.Predictor(self.model, self.partitioner, params, self.cfg.batch_size,
                          self.decoding)
    metrics_future, _ = self.evaluator.evaluate(
        compute_metrics=True, step=step, predict_fn=predictor.predict_dataset,
        score_fn=_score_fn(self.model, self.partitioner, params, self.cfg.batch_size))
    all_metrics = metrics_future.result() or {}
    out = {}
    for task_name, metrics in all_metrics.items():
      for name, value in metrics.items():
        scalar = _scalar(value)
        if scalar is not None:
          out[f"{task_name}/{name}"] = scalar
    return out


def inference_eval(model, partitioner, params, cfg: input_pipeline.DatasetConfig, step: int,
                   decoding: prediction.DecodingConfig = prediction.DecodingConfig(),
                   num_examples: Optional[int] = None,
                   log_dir: Optional[str] = None) -> Dict[str, float]:
  """One-off `InferenceEvaluator`."""
  evaluator = InferenceEvaluator(model, partitioner, cfg, decoding, num_examples, log_dir)
  return evaluator(params, step)


def _score_fn(model, partitioner, params, batch_size: int):
  """seqio's score_fn: log-likelihood of each example's targets."""
  def score(ds):
    results = []
    per_host = batch_size // jax.process_count()
    start = jax.process_index() * per_host
    for indices, batch in prediction.padded_batches(ds, batch_size):
      keys = [k for k in ("encoder_input_tokens", "decoder_input_tokens",
                          "decoder_target_tokens", "decoder_loss_weights") if k in batch]
      host = {k: batch[k][start:start + per_host] for k in keys}
      device_batch = partitioner.shard_batch(host)
      with partitioner.mesh, partitioner.axis_rules():
        scores = model.score_batch(params, device_batch)
      scores = np.asarray(multihost_utils.process_allgather(scores, tiled=True))
      results.extend((int(i), float(s)) for i, s in zip(indices, scores))
    return results
  return score


class TrainingEvaluations:
  """The training run's evaluators (teacher-forced on `train_eval_cfg`, inference on
  `infer_eval_cfg`), built at the first evaluation and reused after; metrics go to `writer`."""

  def __init__(self, trainer, partitioner, train_eval_cfg, infer_eval_cfg, eval_steps,
               infer_eval_num_examples, decoding, writer, model_dir):
    self.trainer, self.partitioner, self.writer = trainer, partitioner, writer
    self.train_eval_cfg, self.infer_eval_cfg = train_eval_cfg, infer_eval_cfg
    self.eval_steps, self.decoding = eval_steps, decoding
    self.num_examples = infer_eval_num_examples
    self.log_dir = os.path.join(model_dir, model_dir_lib.INFERENCE_EVAL_DIR)
    self.teacher_forced = None
    self.inference = None

  def __call__(self, state, step: int) -> Dict[str, Dict[str, float]]:
    out = {}
    if self.train_eval_cfg is not None:
      if self.teacher_forced is None:
        self.teacher_forced = TeacherForcedEvaluator(self.trainer, self.train_eval_cfg,
                                                     self.eval_steps)
      out["training_eval"] = self.teacher_forced(state.params)
    if self.infer_eval_cfg is not None:
      if self.inference is None:
        self.inference = InferenceEvaluator(self.trainer.model, self.partitioner,
                                            self.infer_eval_cfg, self.decoding,
                                            self.num_examples, log_dir=self.log_dir)
      out["inference_eval"] = self.inference(state.params, step)
    for split, metrics in out.items():
      self.writer.write(step, metrics, split)
    return out
