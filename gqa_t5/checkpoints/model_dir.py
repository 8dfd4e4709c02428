"""The MODEL_DIR of a training run: its layout, recorded model configuration, and the Orbax
checkpoints of the train state plus the input pipeline's position.

Layout (the one place that spells it):
  MODEL_DIR/model_config.json            the model's configuration (checked on resume)
  MODEL_DIR/config.gin                   gin's operative configuration
  MODEL_DIR/metrics.jsonl                one JSON line per logged step and split
  MODEL_DIR/<split>/                     TensorBoard summaries ('train', 'training_eval', ...)
  MODEL_DIR/inference_eval/              seqio's prediction logs
  MODEL_DIR/checkpoints/<step>/{state,data}
  MODEL_DIR/LOCK                         the running trainer's pid and host (ModelDirLock)
Orbax writes each checkpoint under a temporary name and renames it when complete, so a process
killed mid-save leaves the previous checkpoint as the latest loadable one. A run whose model
configuration differs in a field that changes the parameters is refused before any compute.
The state saved is any object with `to_dict()` and a `from_dict` class method (the trainer's
`TrainState`): this layer does not import the trainer.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import signal
import socket
import sys
import threading
import time
from typing import Any, Dict, Mapping, Optional, Tuple

import jax
from jax.experimental import multihost_utils
import numpy as np
import orbax.checkpoint as ocp

from gqa_t5.checkpoints import atomic
from gqa_t5.checkpoints import tree as tree_lib
from gqa_t5.checkpoints.atomic import Interrupted, owner_is_dead, process_owner
from gqa_t5.checkpoints.errors import CheckpointError, describe

CHECKPOINTS_DIR = "checkpoints"
STATE_ITEM = "state"
DATA_ITEM = "data"
MODEL_CONFIG_FILE = "model_config.json"
OPERATIVE_CONFIG_FILE = "config.gin"
METRICS_FILE = "metrics.jsonl"
INFERENCE_EVAL_DIR = "inference_eval"
LOCK_FILE = "LOCK"

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


class ModelDirLocked(ValueError):
  """Another live trainer holds MODEL_DIR's lock (two trainers would both write checkpoints)."""


class ModelDirLock:
  """MODEL_DIR/LOCK: one trainer per MODEL_DIR (a double submit would have two runs writing the
  same checkpoints).

  The lock file records its owner (pid, process start time, host: what the converter's
  temporary directories record, see atomic.py) and is refreshed every HEARTBEAT_S seconds by a
  daemon thread. It is stale, and taken over, when its owner is gone: a dead process of this
  host (a SIGKILL leaves the file behind), or a lock of another host not refreshed for STALE_S
  seconds (a job requeued on another node). Only process 0 of a multi-process run takes it.
  """

  HEARTBEAT_S = 30.0
  STALE_S = 300.0

  def __init__(self, model_dir: str):
    self.model_dir = model_dir
    self.path = os.path.join(model_dir, LOCK_FILE)
    self._stop = threading.Event()
    self._thread: Optional[threading.Thread] = None

  def __enter__(self) -> "ModelDirLock":
    self.acquire()
    return self

  def __exit__(self, *exc) -> None:
    self.release()

  def _read(self) -> Optional[dict]:
    try:
      with open(self.path) as f:
        owner = json.load(f)
    except FileNotFoundError:
      return None
    except (OSError, ValueError):
      return {}  # unreadable or half-written: judged by its age alone
    return owner if isinstance(owner, dict) else {}

  def _is_stale(self, owner: dict) -> bool:
    try:
      age = time.time() - os.path.getmtime(self.path)
    except OSError:
      return True
    if owner.get("host") == socket.gethostname() and isinstance(owner.get("pid"), int):
      return owner_is_dead(owner)
    return age > self.STALE_S

  def acquire(self) -> None:
    if jax.process_index() != 0:
      return
    os.makedirs(self.model_dir, exist_ok=True)
    for _ in range(3):
      try:
        fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
      except FileExistsError:
        owner = self._read()
        if owner is None:
          continue  # released meanwhile
        if not self._is_stale(owner):
          since = owner.get("since")
          since = time.strftime(" since %Y-%m-%d %H:%M:%S", time.localtime(since)) \
              if isinstance(since, (int, float)) else ""
          raise ModelDirLocked(
              f"MODEL_DIR {self.model_dir} is in use by process {owner.get('pid', '?')} on host "
              f"{owner.get('host', '?')}{since} (lock file {self.path}): two trainers would "
              "both write its checkpoints. Stop that run or use another MODEL_DIR; if that "
              f"process is gone, delete {self.path}.")
        logging.warning("taking over the stale lock %s of process %s on %s", self.path,
                        owner.get("pid"), owner.get("host"))
        with contextlib.suppress(FileNotFoundError):
          os.remove(self.path)
        continue
      with os.fdopen(fd, "w") as f:
        json.dump(dict(process_owner(), since=time.time()), f)
      self._thread = threading.Thread(target=self._heartbeat, daemon=True,
                                      name="gqa_t5-model-dir-lock")
      self._thread.start()
      return
    raise ModelDirLocked(f"cannot take the lock {self.path} of MODEL_DIR {self.model_dir}: "
                         "other processes keep creating it")

  def _heartbeat(self) -> None:
    while not self._stop.wait(self.HEARTBEAT_S):
      with contextlib.suppress(OSError):
        os.utime(self.path)

  def release(self) -> None:
    if self._thread is None:
      return
    self._stop.set()
    self._thread.join()
    self._thread = None
    owner = self._read()
    if owner and owner.get("pid") == os.getpid() and owner.get("host") == socket.gethostname():
      with contextlib.suppress(FileNotFoundError):
        os.remove(self.path)


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
    atomic.write_json(path, current, indent=2, sort_keys=True)


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

  def _saving(self, what: str):
    """Turns a failed write (a full disk: Orbax's RESOURCE_EXHAUSTED, a read-only or vanished
    directory) into one CheckpointError naming the directory; an async save's error surfaces
    at the next save or wait."""
    return _save_errors(f"cannot save {what} in {self.directory}")

  def save(self, state, data_state: Mapping[str, Any], force: bool = False) -> bool:
    step = int(jax.device_get(state.step))
    if step in self.manager.all_steps():
      return False
    with self._saving(f"the checkpoint of step {step}"):
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
    try:
      restored = self.manager.restore(
          step, args=ocp.args.Composite(
              **{STATE_ITEM: ocp.args.StandardRestore(abstract_state.to_dict()),
                 DATA_ITEM: ocp.args.JsonRestore()}))
    except (ValueError, RuntimeError, OSError, KeyError, TypeError) as error:
      older = [s for s in self.all_steps() if s < step]
      offer = (f" The previous checkpoint is step {older[-1]}: move "
               f"{os.path.join(self.directory, str(step))} out of {self.directory} to resume "
               "from it." if older else "")
      raise CheckpointError(f"cannot restore the checkpoint of step {step} in {self.directory}"
                            f" (truncated or corrupt?): {_first_line(error)}.{offer}") from error
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
    if self.manager is not None:
      with self._saving("a checkpoint"):
        self.manager.wait_until_finished()

  def close(self) -> None:
    """Joins the save in flight and stops Orbax's threads; a no-op the second time."""
    if self.manager is None:
      return
    manager, self.manager = self.manager, None
    try:
      with self._saving("a checkpoint"):
        manager.wait_until_finished()
    finally:
      manager.close()


def _first_line(error: BaseException) -> str:
  """A library error's first line ('Type: message'), at most 400 characters: tensorstore and
  Orbax messages run to many lines of source locations."""
  text = describe(error).strip().splitlines()[0]
  return text if len(text) <= 400 else text[:400] + "..."


@contextlib.contextmanager
def _save_errors(what: str):
  try:
    yield
  except CheckpointError:
    raise
  except (ValueError, RuntimeError, OSError) as error:
    raise CheckpointError(f"{what}: {_first_line(error)}") from error
