"""The evaluators, in the training loop and shared by the standalone runs (eval.py, infer.py):
the teacher-forced loss loop, inference evaluation (decode + the task's metrics through
`seqio.Evaluator`), batched decoding, loading a checkpoint's parameters, writing predictions.

Every process runs the same evaluation dataset; each contributes its slice of every batch to
the global (data-sharded) array and reads back the gathered predictions, so multi-host
inference needs no extra coordination.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import jax
import numpy as np
from jax.experimental import multihost_utils

from gqa_t5 import decoding as decoding_lib
from gqa_t5 import initial_checkpoint as initial
from gqa_t5 import input_pipeline
from gqa_t5 import metrics_writer
from gqa_t5 import partitioning as partitioning_lib
from gqa_t5 import trainer as trainer_lib
from gqa_t5.checkpoints import atomic
from gqa_t5.checkpoints import model_dir as model_dir_lib


@dataclasses.dataclass(frozen=True)
class DecodingConfig:
  """How inference decodes: 'greedy' (the paper's), 'beam' (`num_decodes` beams) or 'sample'
  (one sample). The method picks the model's `decode_fn`, whatever the model was built with."""
  method: str = "greedy"
  max_decode_length: Optional[int] = None
  num_decodes: int = 4
  alpha: float = 0.6
  temperature: float = 1.0
  topk: int = 0

  def decode_fn(self):
    if self.method not in decoding_lib.DECODE_FNS:
      raise ValueError(f"unknown decoding method {self.method!r}: use one of "
                       f"{sorted(decoding_lib.DECODE_FNS)}")
    return decoding_lib.DECODE_FNS[self.method]

  def kwargs(self) -> Dict[str, Any]:
    """`predict_batch_with_aux`'s keyword arguments."""
    params = {"beam": dict(alpha=self.alpha),
              "sample": dict(temperature=self.temperature, topk=self.topk)}.get(self.method, {})
    if self.max_decode_length is not None:
      params["max_decode_length"] = self.max_decode_length
    return dict(decoder_params=params,
                num_decodes=self.num_decodes if self.method == "beam" else 1)


def teacher_forced_eval(model, params, batches: Iterable[Mapping[str, Any]],
                        eval_step: Optional[Callable[[Any, Any], Any]] = None
                        ) -> Dict[str, float]:
  """THE teacher-forced loss loop: the model's `loss_fn` (losses.py) on every batch, summed,
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


class Predictor:
  """Batched, sharded decoding of an (index, features) dataset."""

  def __init__(self, model, partitioner, params, batch_size: int,
               decoding: DecodingConfig = DecodingConfig()):
    self.model = model.with_decode_fn(decoding.decode_fn())
    self.partitioner = partitioner
    self.params = params
    self.batch_size = batch_size
    self.decoding = decoding
    if batch_size % partitioner.mesh.shape["data"]:
      raise ValueError(f"inference batch size {batch_size} is not a multiple of the data axis "
                       f"size {partitioner.mesh.shape['data']}")

  def _host_rows(self, batch: Mapping[str, np.ndarray]) -> Dict[str, np.ndarray]:
    per_host = self.batch_size // jax.process_count()
    start = jax.process_index() * per_host
    return {k: v[start:start + per_host] for k, v in batch.items()}

  def predict_batch(self, batch: Mapping[str, np.ndarray]) -> Tuple[np.ndarray, np.ndarray]:
    """(tokens [B, L], scores [B]) for a full global batch of numpy features."""
    features = {k: batch[k] for k in ("encoder_input_tokens", "decoder_input_tokens")
                if k in batch}
    device_batch = self.partitioner.shard_batch(self._host_rows(features))
    with self.partitioner.mesh, self.partitioner.axis_rules():
      tokens, aux = self.model.predict_batch_with_aux(self.params, device_batch,
                                                      **self.decoding.kwargs())
    tokens = multihost_utils.process_allgather(tokens, tiled=True)
    scores = multihost_utils.process_allgather(aux["scores"], tiled=True)
    return np.asarray(tokens), np.asarray(scores)

  def predict_dataset(self, ds) -> List[Tuple[int, List[int]]]:
    """seqio's predict_fn: (index, features) dataset -> [(index, decoded tokens)].

    Rows keep their full decode length (zeros after EOS): seqio stacks them into one array,
    and the vocabulary's decode stops at EOS."""
    results = []
    for indices, batch in padded_batches(ds, self.batch_size):
      tokens, _ = self.predict_batch(batch)
      for row, index in enumerate(indices):
        results.append((int(index), tokens[row].tolist()))
    return results


def padded_batches(ds, batch_size: int) -> Iterable[Tuple[List[int], Dict[str, np.ndarray]]]:
  """Groups an (index, features) dataset into full batches (the last one zero-padded)."""
  indices, rows = [], []
  for index, features in ds.as_numpy_iterator():
    indices.append(index)
    rows.append(features)
    if len(rows) == batch_size:
      yield indices, _stack(rows, batch_size)
      indices, rows = [], []
  if rows:
    yield indices, _stack(rows, batch_size)


def _stack(rows: Sequence[Mapping[str, np.ndarray]], batch_size: int) -> Dict[str, np.ndarray]:
  batch = {k: np.stack([r[k] for r in rows]) for k in rows[0]}
  return input_pipeline.pad_batch(batch, batch_size)


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
               decoding: DecodingConfig = DecodingConfig(), num_examples: Optional[int] = None,
               log_dir: Optional[str] = None):
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
    predictor = Predictor(self.model, self.partitioner, params, self.cfg.batch_size,
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
                   decoding: DecodingConfig = DecodingConfig(), num_examples: Optional[int] = None,
                   log_dir: Optional[str] = None) -> Dict[str, float]:
  """One-off `InferenceEvaluator`."""
  return InferenceEvaluator(model, partitioner, cfg, decoding, num_examples, log_dir)(params,
                                                                                       step)


def _score_fn(model, partitioner, params, batch_size: int):
  """seqio's score_fn: log-likelihood of each example's targets."""
  def score(ds):
    results = []
    per_host = batch_size // jax.process_count()
    start = jax.process_index() * per_host
    for indices, batch in padded_batches(ds, batch_size):
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


def write_predictions(path: str, records: Iterable[Mapping[str, Any]]) -> int:
  """Writes JSON lines atomically (temporary file, then rename); returns the count."""
  if jax.process_index() != 0:
    return 0
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  count = 0
  with atomic.open_for_keeps(path, "w") as f:
    for record in records:
      f.write(json.dumps(record, ensure_ascii=False) + "\n")
      count += 1
  logging.info("wrote %d predictions to %s", count, path)
  return count


def load_checkpoint_params(model, partitioner, checkpoint_path: str,
                           kv_conversion: Optional[str] = None):
  """(device parameters placed for `partitioner`, step) of a checkpoint in any format, checked
  tensor by tensor against the model (what eval and infer decode with)."""
  config = getattr(model.module, "config", None)
  if config is not None:
    partitioner.setup_for(config)
    partitioning_lib.validate(config, partitioner.mesh_shape)
  abstract, axes = partitioning_lib.abstract_params_and_axes(model)
  return initial.load_for_model(checkpoint_path, config, abstract, partitioner.shardings(axes),
                                kv_conversion)


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
