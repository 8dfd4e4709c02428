"""Scalars to TensorBoard (clu metric writers) and to MODEL_DIR/metrics.jsonl; a progress bar.

Only process 0 writes; other processes get a writer that drops everything.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
from typing import Mapping, Optional

import jax


class MetricsWriter:
  """write(step, {name: float}, split) -> TensorBoard `split/name` + one JSON line."""

  def __init__(self, model_dir: Optional[str], tensorboard: bool = True):
    self.enabled = model_dir is not None and jax.process_index() == 0
    self._tb = {}
    self._tensorboard = tensorboard
    self._model_dir = model_dir
    self._jsonl = None
    if self.enabled:
      os.makedirs(model_dir, exist_ok=True)
      self._jsonl = open(os.path.join(model_dir, "metrics.jsonl"), "a", buffering=1)

  def _writer(self, split: str):
    if split not in self._tb:
      try:
        from clu import metric_writers  # pylint: disable=g-import-not-at-top
      except ImportError as error:  # clu's TensorBoard writer needs tensorboard + TensorFlow
        logging.warning("no TensorBoard summaries (%s); metrics go to metrics.jsonl only",
                        error)
        self._tensorboard = False
        return None
      self._tb[split] = metric_writers.create_default_writer(
          os.path.join(self._model_dir, split), asynchronous=False)
    return self._tb[split]

  def write(self, step: int, scalars: Mapping[str, float], split: str = "train") -> None:
    if not self.enabled or not scalars:
      return
    clean = {k: float(v) for k, v in scalars.items()}
    writer = self._writer(split) if self._tensorboard else None
    if writer is not None:
      writer.write_scalars(int(step), clean)
    record = {"step": int(step), "split": split, "time": time.time()}
    record.update({k: (v if math.isfinite(v) else str(v)) for k, v in clean.items()})
    self._jsonl.write(json.dumps(record, sort_keys=True) + "\n")

  def flush(self) -> None:
    for writer in self._tb.values():
      writer.flush()
    if self._jsonl:
      self._jsonl.flush()

  def close(self) -> None:
    for writer in self._tb.values():
      writer.close()
    self._tb = {}
    if self._jsonl:
      self._jsonl.close()
      self._jsonl = None


class Progress:
  """A one-line progress display: step, steps/s, tokens/s, loss and ETA (process 0 only)."""

  def __init__(self, first_step: int, last_step: int, enabled: bool = True, stream=None):
    self.first_step = first_step
    self.last_step = last_step
    self.enabled = enabled and jax.process_index() == 0
    self.stream = stream or sys.stderr
    self._t0 = time.perf_counter()
    self._last_t = self._t0
    self._last_step = first_step
    self._tokens = 0.0
    self._first = None  # (time, step) of the first update

  def update(self, step: int, tokens: float, loss: Optional[float] = None) -> Mapping[str, float]:
    """Records that `step` is done after `tokens` more tokens; returns the rates."""
    now = time.perf_counter()
    self._tokens += tokens
    elapsed = max(now - self._t0, 1e-9)
    done = step - self.first_step
    steps_per_s = done / elapsed
    tokens_per_s = self._tokens / elapsed
    # The ETA counts from the first update on: the first step's time is mostly compilation.
    if self._first is None:
      self._first = (now, step)
    since_t, since_step = self._first
    rate = (step - since_step) / (now - since_t) if step > since_step else 0.0
    remaining = (self.last_step - step) / rate if rate > 0 else float("inf")
    if self.enabled:
      eta = _format_seconds(remaining)
      loss_text = f" loss {loss:.4f}" if loss is not None else ""
      self.stream.write(f"\rstep {step}/{self.last_step} | {steps_per_s:.2f} steps/s | "
                        f"{tokens_per_s:,.0f} tokens/s |{loss_text} | ETA {eta}   ")
      self.stream.flush()
    self._last_t, self._last_step = now, step
    return {"steps_per_second": steps_per_s, "tokens_per_second": tokens_per_s}

  def close(self) -> None:
    if self.enabled:
      self.stream.write("\n")
      self.stream.flush()


def _format_seconds(seconds: float) -> str:
  if not math.isfinite(seconds):
    return "?"
  seconds = int(seconds)
  hours, rest = divmod(seconds, 3600)
  minutes, secs = divmod(rest, 60)
  return f"{hours:d}:{minutes:02d}:{secs:02d}"
