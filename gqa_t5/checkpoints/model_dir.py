"""The MODEL_DIR of a training run: its recorded model configuration, its lock, and the Orbax
checkpoints of the train state plus the input pipeline's position (and a CRC-32 per tensor).

The layout is spelled in checkpoints/run_layout.py (its names are re-exported here).
Each checkpoint records a CRC-32 of every train-state tensor (its `checksums` item): Orbax and
OCDBT check nothing, so a flipped bit in a data file restores silently. A resume reads the sums
back and refuses a checkpoint that fails them, naming it and the previous one that verifies;
`gqa-t5 verify MODEL_DIR` checks every checkpoint from the files alone.
Orbax writes each checkpoint under a temporary name and renames it when complete, so a process
killed mid-save leaves the previous checkpoint as the latest loadable one. A run whose model
configuration differs in a field that changes the parameters is refused before any compute.
The state saved is any object with `to_dict()` and a `from_dict` class method (the trainer's
`TrainState`): this layer does not import the trainer.
"""

from __future__ import annotations

import contextlib
import dataclasses
import glob
import json
import logging
import os
import re
import shutil
import signal
import socket
import sys
import threading
import time
from concurrent import futures
from typing import Any, Dict, List, Mapping, Optional, Tuple

import jax
from jax.experimental import multihost_utils
import numpy as np
import orbax.checkpoint as ocp

from gqa_t5.checkpoints import atomic
from gqa_t5.checkpoints import checksums as checksums_lib
from gqa_t5.checkpoints import orbax_format
from gqa_t5.checkpoints import run_layout
from gqa_t5.checkpoints import tree as tree_lib
from gqa_t5.checkpoints.atomic import Interrupted, owner_is_dead, process_owner
from gqa_t5.checkpoints.errors import CheckpointError, describe, describe_os_error
# The layout's names and look-ups, used through this module by the trainer and the tests.
from gqa_t5.checkpoints.run_layout import (  # noqa: F401
    CHECKPOINTS_DIR, CHECKSUMS_ITEM, DATA_ITEM, INFERENCE_EVAL_DIR, LOCK_FILE, METRICS_FILE,
    MODEL_CONFIG_FILE, OPERATIVE_CONFIG_FILE, STATE_ITEM, checkpoint_steps, checkpoints_dir,
    latest_checkpoint_dir)


# Fields that do not change the parameter tree: a run may change them on resume.
_RUNTIME_FIELDS = ("dropout_rate", "dtype", "remat_policy", "float32_attention_logits")


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
  """period: save every `period` steps (and at the end); keep: how many to keep (None: all);
  async_save: write in the background while training continues; save_on_preemption: on
  SIGTERM/SIGINT, save the current step before exiting (else only the save in flight is
  finished); checksums: record a CRC-32 per train-state tensor in each checkpoint and check it
  on restore (costs, at each save, one more device-to-host copy of the state and the CRC on
  the host's cores, about 1 GB/s each; a run whose state is sharded over processes records
  none)."""
  period: int = 1000
  keep: Optional[int] = None
  async_save: bool = True
  save_on_preemption: bool = True
  checksums: bool = True


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


def _fully_addressable(tree) -> bool:
  """Every array of `tree` is whole on this process (a single-process run, or replicated)."""
  return all(getattr(leaf, "is_fully_addressable", True)
             for leaf in jax.tree_util.tree_leaves(tree))


def state_checksums(state_dict) -> Dict[str, str]:
  """{tensor name: 'crc32:...'} of a train state's dict (as saved), from host copies; the CRCs
  run on a thread each (zlib releases the GIL)."""
  flat = {name: leaf for name, leaf in tree_lib.flatten(jax.device_get(state_dict)).items()
          if leaf is not None}
  with futures.ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
    sums = dict(zip(flat, pool.map(checksums_lib.tensor_checksum, flat.values())))
  return sums


def recorded_checksums(step_dir: str) -> Optional[Dict[str, str]]:
  """The checksums a training checkpoint recorded (None: it records none, e.g. written before
  they were, or with checksums=False); CheckpointError when the record is unreadable."""
  path = run_layout.checksums_file(step_dir)
  try:
    with open(path) as f:
      record = json.load(f)
  except FileNotFoundError:
    return None
  except (OSError, ValueError) as error:
    raise CheckpointError(f"cannot read the checksums {path}: {error}") from error
  sums = record.get("tensors") if isinstance(record, dict) else None
  if not isinstance(sums, dict):
    raise CheckpointError(f"the checksums {path} hold no 'tensors' record")
  return sums


def verify_checkpoint(step_dir: str, report=None) -> Optional[List[str]]:
  """Reads a training checkpoint's state back from its files and compares every tensor with
  its recorded checksum: the problems (empty: all match), or None when it records none."""
  expected = recorded_checksums(step_dir)
  if expected is None:
    return None
  tensors = orbax_format.open_item_tensors(os.path.join(step_dir, STATE_ITEM))
  return checksums_lib.compare(expected, tensors, run_layout.checksums_file(step_dir), report)


class Checkpointer:
  """Saves/restores (train state, data position) with orbax's CheckpointManager."""

  def __init__(self, model_dir: str, cfg: CheckpointConfig = CheckpointConfig()):
    self.directory = checkpoints_dir(model_dir)
    self.cfg = cfg
    options = ocp.CheckpointManagerOptions(
        max_to_keep=cfg.keep, save_interval_steps=1, create=True,
        enable_async_checkpointing=cfg.async_save, cleanup_tmp_directories=True)
    self.manager = ocp.CheckpointManager(self.directory, options=options,
                                         item_names=(STATE_ITEM, DATA_ITEM, CHECKSUMS_ITEM))
    # The step of the last save not yet known to be complete (a background save in flight).
    self._in_flight: Optional[int] = None
    # A failed save or restore is reported here as one CheckpointError: the tracebacks Orbax's
    # threads print or log for it are noise around that line.
    orbax_format.quiet_io_left_in_flight()
    orbax_format.hold_logged_failures()

  def latest_step(self) -> Optional[int]:
    return self.manager.latest_step()

  def step_dir(self, step: int) -> str:
    """The folder of the checkpoint of `step`."""
    return os.path.join(self.directory, str(step))

  def all_steps(self):
    return list(self.manager.all_steps())

  def save(self, state, data_state: Mapping[str, Any], force: bool = False) -> bool:
    """Starts the checkpoint of the state's step (in the background with `async_save`) once
    the previous one is complete; a failed previous one raises CheckpointError naming it."""
    step = int(jax.device_get(state.step))
    if step in self.manager.all_steps():
      return False
    self.wait(at_step=step)
    state_dict = state.to_dict()
    items = {STATE_ITEM: ocp.args.StandardSave(state_dict),
             DATA_ITEM: ocp.args.JsonSave(dict(data_state))}
    # Every process passes the same items (Orbax's save is collective); process 0 writes them.
    if self.cfg.checksums and _fully_addressable(state_dict):
      sums = state_checksums(state_dict) if jax.process_index() == 0 else {}
      items[CHECKSUMS_ITEM] = ocp.args.JsonSave({"algorithm": checksums_lib.ALGORITHM,
                                                 "tensors": sums})
    try:
      saved = self.manager.save(step, args=ocp.args.Composite(**items), force=force)
    except (ValueError, RuntimeError, OSError) as error:
      raise self._save_failed(step, error) from error
    if saved:
      self._in_flight = step
      if not self.cfg.async_save:
        self.wait()
    return saved

  def check_background_save(self, at_step: Optional[int] = None) -> None:
    """Between training steps: a background save that has ended is checked at once, so a
    failed one (a full disk) stops the run at the next step rather than at the next save, a
    checkpoint period later. Costs a flag read while a save is in flight, nothing otherwise."""
    in_progress = getattr(self.manager, "is_saving_in_progress", None)
    if self._in_flight is not None and in_progress is not None and not in_progress():
      self.wait(at_step)

  def wait(self, at_step: Optional[int] = None) -> None:
    """Blocks until the save in flight is complete. One that failed, or that Orbax left
    unfinished, raises CheckpointError naming its step, the cause and the latest complete
    checkpoint, after its partial folder is removed (`at_step`: the training step at which the
    failure was found, for the message)."""
    if self.manager is None:
      return
    step, self._in_flight = self._in_flight, None
    try:
      self.manager.wait_until_finished()
    except (ValueError, RuntimeError, OSError) as error:
      raise self._save_failed(step, error, at_step) from error
    # Orbax can log a failed commit and skip the checkpoint's finalisation without raising:
    # the step's folder then never appears. (Process 0 renames it, so process 0 checks.)
    if (step is not None and jax.process_index() == 0
        and not os.path.isdir(self.step_dir(step))):
      raise self._save_failed(step, orbax_format.last_held_failure(), at_step)

  def _save_failed(self, step: Optional[int], error: Optional[BaseException],
                   at_step: Optional[int] = None) -> CheckpointError:
    """The CheckpointError of a failed save: its step, the directory, the cause as the system
    named it, when it was found, and which checkpoint a resume would start from."""
    what = f"the checkpoint of step {step}" if step is not None else "a checkpoint"
    cause = _write_cause(error) if error is not None else "Orbax did not complete it"
    found = (f"; its write in the background failed, found at step {at_step}"
             if at_step is not None and step is not None and at_step != step else "")
    if step is not None and jax.process_index() == 0:
      for partial in glob.glob(os.path.join(self.directory, f"{step}.orbax-checkpoint-tmp*")):
        shutil.rmtree(partial, ignore_errors=True)  # its space back, on a full disk
    complete = sorted(s for s in checkpoint_steps(os.path.dirname(self.directory))
                      if s != step)
    latest = (f" The latest complete checkpoint is step {complete[-1]}." if complete
              else " No checkpoint of this run is complete.")
    return CheckpointError(f"cannot save {what} in {self.directory}: {cause}{found}.{latest}")

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
      raise CheckpointError(f"cannot restore the checkpoint of step {step} in {self.directory}"
                            f" (truncated or corrupt?): {_first_line(error)}."
                            f"{self._offer_previous(step)}") from error
    problems = self._check_restored(step, restored[STATE_ITEM])
    if problems:
      del restored  # the device memory of the refused state, before older ones are read
      shown = "; ".join(problems[:3]) + (f"; and {len(problems) - 3} more"
                                         if len(problems) > 3 else "")
      raise CheckpointError(f"the checkpoint of step {step} in {self.directory} fails its "
                            f"checksums ({len(problems)} tensor(s); its data changed since it "
                            f"was written): {shown}.{self._offer_previous(step)}")
    return (type(abstract_state).from_dict(restored[STATE_ITEM]),
            dict(restored[DATA_ITEM] or {}))

  def _check_restored(self, step: int, state_dict) -> List[str]:
    """The restored state against the checksums its checkpoint recorded (nothing to check
    without a record, or for a state sharded over processes)."""
    expected = recorded_checksums(self.step_dir(step))
    if expected is None or not self.cfg.checksums or not _fully_addressable(state_dict):
      return []
    found = state_checksums(state_dict)
    problems = [f"{name}: recorded in the checkpoint but not restored"
                for name in sorted(set(expected) - set(found))]
    problems += [f"{name}: checksum {found[name]}, recorded {expected[name]}"
                 for name in sorted(set(expected) & set(found)) if found[name] != expected[name]]
    return problems

  def _offer_previous(self, step: int) -> str:
    """' The previous checkpoint is step N ...: move ... to resume from it.', naming the newest
    older checkpoint that passes its checksums (read from its files; one that records none is
    offered as unverified), or '' when there is none."""
    failed = []
    for older in sorted((s for s in self.all_steps() if s < step), reverse=True):
      try:
        problems = verify_checkpoint(self.step_dir(older))
      except (CheckpointError, OSError):
        problems = ["unreadable"]  # not offered: it would fail the resume too
      if problems:
        failed.append(older)
        continue
      verified = "its checksums verified" if problems is not None else "it records no checksums"
      also = (f"; step(s) {', '.join(map(str, failed))} fail theirs too" if failed else "")
      newer = [self.step_dir(s) for s in self.all_steps() if s > older]
      return (f" The previous checkpoint is step {older} ({verified}{also}): move "
              f"{' and '.join(newer)} out of {self.directory} to resume from it.")
    if failed:
      return f" The older checkpoints (steps {', '.join(map(str, failed))}) fail too."
    return ""

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

  def close(self) -> None:
    """Joins the save in flight and stops Orbax's threads; a no-op the second time."""
    if self.manager is None:
      return
    try:
      self.wait()
    finally:
      manager, self.manager = self.manager, None
      manager.close()


def _first_line(error: BaseException) -> str:
  """A library error's first line ('Type: message'), at most 400 characters: tensorstore and
  Orbax messages run to many lines of source locations."""
  text = describe(error).strip().splitlines()[0]
  return text if len(text) <= 400 else text[:400] + "..."


# tensorstore's write errors name the system's error by number ("[os_error_code='28']") or text
# ("[OS error: No space left on device]") after the file, in a message of many lines.
_OS_ERROR_CODE = re.compile(r"os_error_code='?(\d+)")
_OS_ERROR_TEXT = re.compile(r"\[OS error: ([^\]]+)\]")
_WRITTEN_FILE = re.compile(r'(?:Failed writing|local file):? "([^"]+)"')


def _write_cause(error: BaseException) -> str:
  """What made a write fail, as the user needs it first: 'No space left on device (writing
  FILE)' from tensorstore's message, 'PATH: cause' from an OSError, else the first line."""
  if isinstance(error, OSError):
    return describe_os_error(error)
  text = describe(error)
  code, named = _OS_ERROR_CODE.search(text), _OS_ERROR_TEXT.search(text)
  if code is None and named is None:
    return _first_line(error)
  cause = os.strerror(int(code.group(1))) if code is not None else named.group(1)
  files = _WRITTEN_FILE.findall(text)
  return cause + (f" (writing {files[-1]})" if files else "")
