"""Evaluation: teacher-forced loss/accuracy, and inference evaluation (decode + the task's
metrics through `seqio.Evaluator`), plus writing predictions to JSON lines.

Every process runs the same evaluation dataset; each contributes its slice of every batch to
the global (data-sharded) array and reads back the gathered predictions, so multi-host
inference needs no extra coordination.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import jax
import numpy as np
from jax.experimental import multihost_utils

from gqa_t5 import decoding as decoding_lib
from gqa_t5 import input_pipeline
from gqa_t5 import trainer as trainer_lib


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


class TeacherForcedEvaluator:
  """Loss and token accuracy over up to `num_batches` global batches of `cfg`'s split (the
  dataset is built once and re-read at every evaluation)."""

  def __init__(self, trainer: trainer_lib.Trainer, cfg: input_pipeline.DatasetConfig,
               num_batches: Optional[int]):
    self.trainer = trainer
    self.cfg = cfg
    ds = input_pipeline.get_dataset(cfg, jax.process_index(), jax.process_count(),
                                    num_epochs=1, drop_remainder=True)
    self.dataset = ds.take(num_batches) if num_batches is not None else ds

  def __call__(self, params) -> Dict[str, float]:
    total = None
    for host_batch in self.dataset.as_numpy_iterator():
      metrics = self.trainer.eval_step(params, self.trainer.shard_batch(host_batch))
      total = trainer_lib.add_metrics(total, jax.device_get(metrics))
    if total is None:
      raise ValueError(f"the {self.cfg.split!r} split of {self.cfg.mixture_or_task_name!r} gave "
                       f"no full batch of {self.cfg.batch_size} examples to evaluate on")
    return trainer_lib.summarize(total,
                                 getattr(self.trainer.model, "loss_normalizing_factor", None))


def teacher_forced_eval(trainer: trainer_lib.Trainer, params, cfg: input_pipeline.DatasetConfig,
                        num_batches: Optional[int]) -> Dict[str, float]:
  return TeacherForcedEvaluator(trainer, cfg, num_batches)(params)


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
    for indices, batch in _padded_batches(ds, self.batch_size):
      tokens, _ = self.predict_batch(batch)
      for row, index in enumerate(indices):
        results.append((int(index), tokens[row].tolist()))
    return results


def _trim(tokens: np.ndarray, eos_id: int) -> List[int]:
  out = []
  for t in tokens.tolist():
    out.append(int(t))
    if t == eos_id:
      break
  return out


def _unpad(tokens: np.ndarray) -> List[int]:
  return [int(t) for t in tokens.tolist() if t != 0]


def _padded_batches(ds, batch_size: int) -> Iterable[Tuple[List[int], Dict[str, np.ndarray]]]:
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
    for indices, batch in _padded_batches(ds, batch_size):
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
  tmp = path + ".tmp"
  count = 0
  with open(tmp, "w") as f:
    for record in records:
      f.write(json.dumps(record, ensure_ascii=False) + "\n")
      count += 1
  os.replace(tmp, path)
  logging.info("wrote %d predictions to %s", count, path)
  return count


def _model_and_params(model, partitioner, checkpoint_path: str, kv_conversion=None):
  from gqa_t5 import initial_checkpoint  # pylint: disable=g-import-not-at-top
  from gqa_t5 import partitioning as partitioning_lib  # pylint: disable=g-import-not-at-top
  config = getattr(model.module, "config", None)
  if config is not None:
    partitioner.setup_for(config)
    partitioning_lib.validate(config, partitioner.mesh_shape)
  variables = jax.eval_shape(
      lambda rng: model.get_initial_variables(
          rng, {"encoder_input_tokens": (1, 8), "decoder_input_tokens": (1, 8)}),
      jax.random.PRNGKey(0))
  abstract = variables["params"]
  if "params_axes" in variables:
    axes = partitioning_lib.params_logical_axes(variables["params_axes"])
  else:
    axes = jax.tree.map(lambda p: (None,) * len(p.shape), abstract)
  shardings = partitioner.shardings(axes)
  return initial_checkpoint.load_for_model(checkpoint_path, config, abstract, shardings,
                                           kv_conversion)


def evaluate(*, model, dataset_cfg: input_pipeline.DatasetConfig, checkpoint_path: str,
             output_dir: str, partitioner=None,
             decoding: DecodingConfig = DecodingConfig(),
             num_examples: Optional[int] = None) -> Dict[str, float]:
  """Inference evaluation of a checkpoint (T5X's eval.py): decode `dataset_cfg`'s split,
  score it with the task's metrics, write them to OUTPUT_DIR/metrics.jsonl and TensorBoard."""
  from gqa_t5 import metrics_writer  # pylint: disable=g-import-not-at-top
  from gqa_t5 import partitioning as partitioning_lib  # pylint: disable=g-import-not-at-top
  partitioner = partitioner or partitioning_lib.Partitioner()
  input_pipeline.check_split(dataset_cfg)
  params, step = _model_and_params(model, partitioner, checkpoint_path)
  metrics = inference_eval(model, partitioner, params, dataset_cfg, step, decoding,
                           num_examples, log_dir=output_dir)
  writer = metrics_writer.MetricsWriter(output_dir)
  writer.write(step, metrics, "inference_eval")
  writer.close()
  if jax.process_index() == 0:
    for name, value in sorted(metrics.items()):
      print(f"{name} = {value:.6g}", flush=True)
  return metrics


def infer(*, model, dataset_cfg: input_pipeline.DatasetConfig, checkpoint_path: str,
          output_dir: str, partitioner=None, decoding: DecodingConfig = DecodingConfig(),
          num_examples: Optional[int] = None) -> str:
  """Decodes `dataset_cfg`'s split (T5X's infer.py); writes one JSON line per example
  ({'index', 'inputs', 'prediction', 'targets', 'score'}) to
  OUTPUT_DIR/<task>-<split>-<step>.jsonl and returns that path."""
  import seqio  # pylint: disable=g-import-not-at-top
  from gqa_t5 import partitioning as partitioning_lib  # pylint: disable=g-import-not-at-top
  partitioner = partitioner or partitioning_lib.Partitioner()
  task = input_pipeline.get_task(dataset_cfg)
  input_pipeline.check_split(dataset_cfg)
  params, step = _model_and_params(model, partitioner, checkpoint_path)
  ds = seqio.get_dataset(
      task, task_feature_lengths=dataset_cfg.task_feature_lengths,
      feature_converter=input_pipeline.feature_converter(pack=False),
      dataset_split=dataset_cfg.split, use_cached=dataset_cfg.use_cached, shuffle=False,
      num_epochs=1, verbose=False, seed=dataset_cfg.seed)
  if num_examples is not None:
    ds = ds.take(num_examples)
  predictor = Predictor(model, partitioner, params, dataset_cfg.batch_size, decoding)
  features = task.output_features
  vocab_in = features["inputs"].vocabulary if "inputs" in features else None
  vocab_out = features["targets"].vocabulary

  # Every process decodes (the step is collective); only process 0 writes.
  records = []
  for _, batch_and_indices in enumerate(_padded_batches(ds.enumerate(), dataset_cfg.batch_size)):
    indices, batch = batch_and_indices
    tokens, scores = predictor.predict_batch(batch)
    for row, index in enumerate(indices):
      record = {"index": int(index),
                "prediction": vocab_out.decode(_trim(tokens[row], model.eos_id)),
                "score": float(scores[row])}
      if vocab_in is not None:
        record["inputs"] = vocab_in.decode(_unpad(batch["encoder_input_tokens"][row]))
      if "decoder_target_tokens" in batch:
        record["targets"] = vocab_out.decode(_unpad(batch["decoder_target_tokens"][row]))
      records.append(record)

  path = os.path.join(output_dir, f"{dataset_cfg.mixture_or_task_name}-{dataset_cfg.split}-"
                                  f"{step}.jsonl")
  write_predictions(path, records)
  if jax.process_index() == 0:
    print(path, flush=True)
  return path
