"""The MODEL_DIR of a training run: its layout, recorded model configuration, and the Orbax
checkpoints of the train state plus the input pipeline's position.

Layout (the one place that spells it):
  MODEL_DIR/model_config.json            the model's configuration (checked on resume)
  MODEL_DIR/config.gin                   gin's operative configuration
  MODEL_DIR/metrics.jsonl                one JSON line per logged step and split
  MODEL_DIR/<split>/                     TensorBoard summaries ('train', 'training_eval', ...)
  MODEL_DIR/inference_eval/              seqio's prediction logs
  MODEL_DIR/checkpoints/<step>/{state,data}
Orbax writes each checkpoint under a temporary name and renames it when complete, so a process
killed mid-save leaves the previous checkpoint as the latest loadable one. A run whose model
configuration differs in a field that changes the parameters is refused before any compute.
The state saved is any object with `to_dict()` and a `from_dict` class method (the trainer's
`TrainState`): this layer does not import the trainer.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import sys
import threading
from typing import Any, Dict, Mapping, Optional, Tuple

import jax
from jax.experimental import multihost_utils
import numpy as np
import orbax.checkpoint as ocp

from gqa_t5.checkpoints import tree as tree_lib
from gqa_t5.checkpoints.atomic import Interrupted

CHECKPOINTS_DIR = "checkpoints"
STATE_ITEM = "state"
DATA_ITEM = "data"
MODEL_CONFIG_FILE = "model_config.json"
OPERATIVE_CONFIG_FILE = "config.gin"
METRICS_FILE = "metrics.jsonl"
INFERENCE_EVAL_DIR = "inference_eval"

# Fields that do not change the parameter tree: a run may change them on resume.
_RUNTIME_FIELDS = ("dropout_rate", "dtype", "remat_policy", "float32_attention_logits")


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
  """period: save every `period` steps (and at the end); keep: how many to keep (None: all);
  async_save: write in the background while training continues; save_on_preemption: on
  SIGTERM/SIGINT, save the current step before exiting (else only the save in flight is
  finished)."""
  period: int = 1000
  keep: Optional[int] = None
  async_save: bool = True
  save_on_preemption: bool = True


class Preempted(Interrupted):
  """Training stopped by SIGTERM/SIGINT; `exit_code` is 128 + signal, `saved_step` the step of
  the checkpoint written on the way out (None: none was)."""

  def __init__(self, signum: int, step: int, directory: str, saved_step: Optional[int]):
    super().__init__(signum)
    self.step, self.directory, self.saved_step = step, directory, saved_step
    name = signal.Signals(signum).name
    if saved_step is not None:
      what = (f"saved the checkpoint of step {saved_step} in {directory}; run the same command "
              "to resume from it")
    else:
      what = f"no checkpoint saved on the way out (save_on_preemption=False); {directory} keeps " \
             "the last periodic one"
    self.args = (f"stopped by {name} at step {step}: {what}",)


class StopSignals:
  """SIGTERM (what SLURM, Kubernetes and TPU VMs send before a preemption) and SIGINT during
  training are noted, not raised: an exception inside Orbax's save would leave a partial
  checkpoint. The loop polls `requested()` between steps, finishes the save in flight, saves the
  current step and raises Preempted. A second signal raises Interrupted at once (the save in
  flight is still joined when the checkpointer closes). Signals the process ignores stay
  ignored; off the main thread nothing is installed."""

  def __init__(self):
    self.signum: Optional[int] = None
    self._previous: Dict[int, Any] = {}

  def __enter__(self) -> "StopSignals":
    if threading.current_thread() is threading.main_thread():
      self._previous = {s: signal.signal(s, self._on_signal) for s in (signal.SIGINT,
                                                                        signal.SIGTERM)
                        if signal.getsignal(s) is not signal.SIG_IGN}
    return self

  def __exit__(self, *exc) -> None:
    self.restore()

  def restore(self) -> None:
    for s, handler in self._previous.items():
      signal.signal(s, handler)
    self._previous = {}

  def _on_signal(self, signum, frame) -> None:
    del frame
    if self.signum is not None:
      self.restore()
      raise Interrupted(signum)  # a second signal: stop now
    self.signum = signum
    sys.stderr.write(f"gqa-t5: {signal.Signals(signum).name} received: finishing the checkpoint "
                     "in flight, saving the current step, then stopping (signal again to stop "
                     "now)\n")

  def requested(self) -> Optional[int]:
    """The signal received, agreed across processes (every process must stop at the same step:
    a multi-process run pays one small all-gather per step for it)."""
    if jax.process_count() == 1:
      return self.signum
    gathered = multihost_utils.process_allgather(np.int32(self.signum or 0))
    received = int(np.max(gathered))
    return received or None


def checkpoints_dir(model_dir: str) -> str:
  return os.path.abspath(os.path.join(model_dir, CHECKPOINTS_DIR))


def checkpoint_steps(model_dir: str) -> list:
  """The steps of the complete checkpoints in MODEL_DIR (Orbax's temporary names excluded)."""
  root = checkpoints_dir(model_dir)
  if not os.path.isdir(root):
    return []
  return sorted(int(d) for d in os.listdir(root) if d.isdigit())


def latest_checkpoint_dir(model_dir: str) -> Optional[str]:
  """MODEL_DIR/checkpoints/<latest step>, or None when MODEL_DIR has no checkpoints/ folder.
  Raises FileNotFoundError when the folder exists but holds no checkpoint."""
  if not os.path.isdir(checkpoints_dir(model_dir)):
    return None
  steps = checkpoint_steps(model_dir)
  if not steps:
    raise FileNotFoundError(f"{model_dir} has a {CHECKPOINTS_DIR}/ directory but no checkpoint")
  return os.path.join(checkpoints_dir(model_dir), str(steps[-1]))


def check_model_dir_config(model_dir: str, config, write: bool = True) -> None:
  """Raises ValueError if MODEL_DIR was written by a model of a different shape; records the
  configuration otherwise (atomically: temporary file, then rename)."""
  path = os.path.join(model_dir, MODEL_CONFIG_FILE)
  current = tree_lib.config_to_dict(config)
  if os.path.exists(path):
    with open(path) as f:
      recorded = json.load(f)
    diffs = [f"{k}: {recorded.get(k)!r} in {path} vs {current.get(k)!r} configured"
             for k in sorted(set(recorded) | set(current))
             if k not in _RUNTIME_FIELDS and recorded.get(k) != current.get(k)]
    if diffs:
      raise ValueError(
          f"model directory {model_dir} was written by a different model configuration ("
          + "; ".join(diffs) + "). Use a new MODEL_DIR, or start from its checkpoint with "
          "INITIAL_CHECKPOINT_PATH (converting it if needed).")
  if write and jax.process_index() == 0:
    os.makedirs(model_dir, exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
      json.dump(current, f, indent=2, sort_keys=True)
    os.replace(tmp, path)


def _nonfinite_leaves(tree) -> list:
  """'/'-joined names of the leaves holding NaN or infinity (host arrays)."""
  bad = []
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    value = np.asarray(leaf)
    if np.issubdtype(value.dtype, np.inexact) and not np.all(np.isfinite(value)):
      bad.append("/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path))
  return bad


class Checkpointer:
  """Saves/restores (train state, data position) with orbax's CheckpointManager."""

  def __init__(self, model_dir: str, cfg: CheckpointConfig = CheckpointConfig()):
    self.directory = checkpoints_dir(model_dir)
    self.cfg = cfg
    options = ocp.CheckpointManagerOptions(
        max_to_keep=cfg.keep, save_interval_steps=1, create=True,
        enable_async_checkpointing=cfg.async_save, cleanup_tmp_directories=True)
    self.manager = ocp.CheckpointManager(self.directory, options=options,
                                         item_names=(STATE_ITEM, DATA_ITEM))

  def latest_step(self) -> Optional[int]:
    return self.manager.latest_step()

  def all_steps(self):
    return list(self.manager.all_steps())

  def save(self, state, data_state: Mapping[str, Any], force: bool = False) -> bool:
    step = int(jax.device_get(state.step))
    if step in self.manager.all_steps():
      return False
    return self.manager.save(
        step, args=ocp.args.Composite(**{STATE_ITEM: ocp.args.StandardSave(state.to_dict()),
                                         DATA_ITEM: ocp.args.JsonSave(dict(data_state))}),
        force=force)

  def restore(self, abstract_state, step: Optional[int] = None) -> Tuple[Any, Dict[str, Any]]:
    """`abstract_state`: a state of jax.ShapeDtypeStruct leaves carrying the target shardings;
    returns (a state of its type, the data position record)."""
    step = self.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"no checkpoint in {self.directory}")
    restored = self.manager.restore(
        step, args=ocp.args.Composite(
            **{STATE_ITEM: ocp.args.StandardRestore(abstract_state.to_dict()),
               DATA_ITEM: ocp.args.JsonRestore()}))
    return (type(abstract_state).from_dict(restored[STATE_ITEM]),
            dict(restored[DATA_ITEM] or {}))

  def last_finite_step(self, abstract_state) -> Tuple[Optional[int], Dict[int, list]]:
    """(the latest step whose saved state is all finite, {newer step: its non-finite
    tensors}), found by reading the checkpoints back, newest first."""
    self.wait()
    skipped = {}
    for step in sorted(self.all_steps(), reverse=True):
      state, _ = self.restore(abstract_state, step)
      bad = _nonfinite_leaves(jax.device_get(state.to_dict()))
      if not bad:
        return step, skipped
      skipped[step] = bad
    return None, skipped

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()
