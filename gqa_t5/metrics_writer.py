"""The scalars a run reports and where they go: summed step metrics -> per-token figures
(`summarize`), TensorBoard (clu metric writers), MODEL_DIR/metrics.jsonl, and a progress bar.

THE loss, everywhere (bar, metrics.jsonl, TensorBoard), is `loss`: cross-entropy per
non-padding target token, token-weighted over the steps summarised (a LOG_PERIOD window, or an
evaluation's batches). T5X's own figure, the loss summed over a batch (z-loss included), is
kept as `summed_loss` (averaged over the window's steps, not summed).
Only process 0 writes; other processes get a writer that drops everything.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import re
import sys
import time
from typing import Any, Dict, Mapping, Optional

import jax
import numpy as np

from gqa_t5.checkpoints import model_dir as model_dir_lib
from gqa_t5.checkpoints.errors import naming_the_file


def add_metrics(total: Optional[Dict[str, float]], metrics: Mapping[str, Any]
                ) -> Dict[str, float]:
  """Host-side running sums of summed step metrics; `steps` counts the steps added,
  learning_rate keeps its latest value and state_is_finite their AND."""
  values = {k: float(np.asarray(v)) for k, v in metrics.items()}
  out = dict(total or {})
  for k, v in values.items():
    if k == "learning_rate":
      out[k] = v
    elif k == "state_is_finite":
      out[k] = min(out.get(k, 1.0), v)
    else:
      out[k] = out.get(k, 0.0) + v
  out["steps"] = out.get("steps", 0.0) + 1.0
  return out


def summarize(metrics: Mapping[str, Any], loss_normalizing_factor=None) -> Dict[str, float]:
  """Summed metrics (`add_metrics`) -> the scalars reported (see the module docstring)."""
  m = {k: float(np.asarray(v)) for k, v in metrics.items()}
  steps = max(m.get("steps", 1.0), 1.0)
  weight = m.get("weight_sum", 0.0)
  loss, z_loss = m.get("loss"), m.get("z_loss", 0.0)
  out = {}
  if isinstance(loss_normalizing_factor, (int, float)) or loss_normalizing_factor is None:
    factor = 1.0 if loss_normalizing_factor is None else float(loss_normalizing_factor)
  else:
    factor = None  # normalised per batch by a data-dependent factor: each step's loss is a mean
  if loss is not None:
    if factor is not None and weight > 0:
      out["loss"] = (loss - z_loss) * factor / weight
      out["z_loss"] = z_loss * factor / weight
      out["loss_per_nonpadding_target_token"] = loss * factor / weight  # T5X's, with z-loss
    else:
      out["loss"] = (loss - z_loss) / steps
      out["z_loss"] = z_loss / steps
    out["summed_loss"] = loss / steps
  if weight > 0 and "accuracy_count" in m:
    out["accuracy"] = m["accuracy_count"] / weight
  for key in ("learning_rate", "weight_sum", "num_sequences"):
    if key in m:
      out[key] = m[key]
  return out


# TensorFlow's errors start with the op's function name: "{{function_node __wrapped__...}} ".
_TF_FUNCTION_PREFIX = re.compile(r"^\{\{[^}]*\}\}\s*")


@contextlib.contextmanager
def _summary_io(directory: str):
  """TensorBoard's writer (TensorFlow underneath) fails with TensorFlow's own error type (a full
  disk: ResourceExhaustedError "... events.out.tfevents...; No space left on device"): it is
  re-raised as an OSError naming the summaries' folder and the file and cause TensorFlow gave,
  an expected failure of files and disks like any other, reported in one line."""
  try:
    yield
  except Exception as error:  # pylint: disable=broad-except  # TensorFlow's, recognised below
    if not any(cls.__name__ == "OpError" for cls in type(error).__mro__):
      raise
    lines = (getattr(error, "message", None) or str(error)).strip().splitlines() or [""]
    cause = _TF_FUNCTION_PREFIX.sub("", lines[0])
    raise OSError(f"cannot write TensorBoard summaries in {directory}: {cause}") from error


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
      self._jsonl = open(os.path.join(model_dir, model_dir_lib.METRICS_FILE), "a",
                         buffering=1)

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
      with _summary_io(os.path.join(self._model_dir, split)):
        writer.write_scalars(int(step), clean)
    record = {"step": int(step), "split": split, "time": time.time()}
    record.update({k: (v if math.isfinite(v) else str(v)) for k, v in clean.items()})
    with naming_the_file(self._jsonl.name):  # line-buffered: a full disk fails this write
      self._jsonl.write(json.dumps(record, sort_keys=True) + "\n")

  def flush(self) -> None:
    for split, writer in self._tb.items():
      with _summary_io(os.path.join(self._model_dir, split)):
        writer.flush()
    if self._jsonl:
      self._jsonl.flush()

  def close(self) -> None:
    tb, self._tb = self._tb, {}
    for split, writer in tb.items():
      with _summary_io(os.path.join(self._model_dir, split)):
        writer.close()
    if self._jsonl:
      self._jsonl.close()
      self._jsonl = None


class Progress:
  """A one-line progress display: step, steps/s, tokens/s, loss and ETA (process 0 only).

  The loss shown is the one `update` was last given (the training loop passes the LOG_PERIOD
  window's loss so far, the figure metrics.jsonl records at the window's end); other lines
  (`print`) go on their own line and the bar is drawn again under them.
  """

  def __init__(self, first_step: int, last_step: int, enabled: bool = True, stream=None):
    self.first_step = first_step
    self.last_step = last_step
    self.enabled = enabled and jax.process_index() == 0
    self.stream = stream or sys.stderr
    self._t0 = time.perf_counter()
    self._step = first_step
    self._tokens = 0.0
    self._loss: Optional[float] = None
    self._width = 0
    self._first = None  # (time, step) of the first update: the ETA counts from it

  def rates(self, now: Optional[float] = None) -> Dict[str, float]:
    now = time.perf_counter() if now is None else now
    elapsed = max(now - self._t0, 1e-9)
    return {"steps_per_second": (self._step - self.first_step) / elapsed,
            "tokens_per_second": self._tokens / elapsed}

  def update(self, step: int, tokens: float, loss: Optional[float] = None) -> Dict[str, float]:
    """Records that `step` is done after `tokens` more tokens; returns the rates."""
    self._step = step
    self._tokens += tokens
    if loss is not None:
      self._loss = loss
    now = time.perf_counter()
    if self._first is None:
      self._first = (now, step)
    rates = self.rates(now)
    self._draw(rates, now)
    return rates

  def _draw(self, rates, now: float) -> None:
    if not self.enabled:
      return
    steps_per_s = rates["steps_per_second"]
    # The ETA counts from the first update on: the first step's time is mostly compilation.
    since_t, since_step = self._first or (self._t0, self.first_step)
    done = self._step - since_step
    eta_rate = done / max(now - since_t, 1e-9) if done > 0 else 0.0
    remaining = (self.last_step - self._step) / eta_rate if eta_rate > 0 else float("inf")
    loss = f" loss {self._loss:.4f} |" if self._loss is not None else ""
    line = (f"step {self._step}/{self.last_step} | {steps_per_s:.2f} steps/s | "
            f"{rates['tokens_per_second']:,.0f} tokens/s |{loss} ETA "
            f"{_format_seconds(remaining)}")
    self.stream.write("\r" + line.ljust(self._width))
    self._width = len(line)
    self.stream.flush()

  def print(self, text: str) -> None:
    """`text` on a line of its own (above the bar when it is shown)."""
    if not self.enabled:
      logging.info("%s", text)
      return
    self.stream.write("\r" + text.ljust(self._width) + "\n")
    self._width = 0
    now = time.perf_counter()
    self._draw(self.rates(now), now)

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
