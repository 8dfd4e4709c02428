"""Batched decoding and its output: how inference decodes (`DecodingConfig`, what the gin
files configure), sharded batched decoding of a dataset (`Predictor`, `padded_batches`), and
writing predictions as JSON lines (`write_predictions`).

Every process runs the same dataset; each contributes its slice of every batch to the global
(data-sharded) array and reads back the gathered predictions, so multi-host decoding needs no
extra coordination.
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
from gqa_t5.checkpoints import atomic


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
