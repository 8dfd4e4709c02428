"""Cached, resumable pipeline stages: the stage cache (`StageStore`).

A stage is a named function of a configuration (and of the stages it reads). It works in
`ROOT/stages/<name>.work/`, which survives a killed run so the stage can resume from what it
left there (e.g. training checkpoints); when it returns, its result is written to
`STAGE.json` inside that directory and the directory is renamed to `ROOT/stages/<name>/`. A
finished stage is therefore all or nothing, and a rerun skips it when the key recorded in its
`STAGE.json` still matches: the key hashes the stage's name, its configuration and the keys of
the stages it depends on, so changing an upstream stage redoes everything downstream of it.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any, Callable, Dict, Mapping, Optional, Sequence

from gqa_t5.checkpoints import atomic

STAGE_FILE = "STAGE.json"
WORK_CONFIG_FILE = "STAGE_CONFIG.json"
_SAFE = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.")


class StageError(RuntimeError):
  """A stage name, configuration or result the store cannot accept."""


@dataclasses.dataclass(frozen=True)
class StageResult:
  name: str
  key: str
  directory: Path
  result: Dict[str, Any]
  cached: bool          # True: found finished, not run now
  seconds: float        # time this stage took when it ran (all its attempts together)


def _canonical(value: Any) -> str:
  try:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), allow_nan=False)
  except (TypeError, ValueError) as error:
    raise StageError(f"stage configuration is not plain JSON ({error}): {value!r}") from None


def stage_key(name: str, config: Mapping[str, Any], deps: Sequence[StageResult] = ()) -> str:
  payload = {"name": name, "config": config, "deps": {d.name: d.key for d in deps}}
  return hashlib.sha256(_canonical(payload).encode()).hexdigest()[:20]


def _write_json_atomic(path: Path, value: Any) -> None:
  atomic.write_json(path, value, indent=2, sort_keys=True, allow_nan=False)


def _read_json(path: Path) -> Optional[Dict[str, Any]]:
  try:
    with open(path) as f:
      value = json.load(f)
  except (OSError, ValueError):
    return None
  return value if isinstance(value, dict) else None


class StageStore:
  """Runs stages under `root/stages`, skipping finished ones whose key still matches.

  log: called with one line per stage event (start, cached, done).
  progress: an object with `begin(name, cached)` and `end(name, seconds, cached)` (e.g.
    `progress.StageProgress`), told about every stage before and after it runs.
  """

  def __init__(self, root: os.PathLike, log: Callable[[str], None] = print, progress=None):
    self.root = Path(root).absolute()
    self.progress = progress
    self.stages_dir = self.root / "stages"
    self.stages_dir.mkdir(parents=True, exist_ok=True)
    self.log = log
    self.executed = []  # names of the stages run (not cached) by this store

  def _paths(self, name: str):
    if not name or not set(name) <= _SAFE or name.startswith("."):
      raise StageError(f"stage name {name!r} must be letters, digits, '-', '_' or '.'")
    return self.stages_dir / name, self.stages_dir / f"{name}.work"

  def finished(self, name: str) -> Optional[Dict[str, Any]]:
    """The STAGE.json record of a finished stage, or None."""
    final, _ = self._paths(name)
    return _read_json(final / STAGE_FILE)

  def run(self, name: str, config: Mapping[str, Any],
          fn: Callable[[Path], Mapping[str, Any]],
          deps: Sequence[StageResult] = ()) -> StageResult:
    """Runs `fn(work_dir) -> result` unless stage `name` already finished with this key.

    `fn` receives the work directory (kept between attempts with the same key, wiped when the
    key changed) and returns a JSON-able dict; paths it mentions should be relative to that
    directory, which becomes `stages/<name>/`.
    """
    final, work = self._paths(name)
    key = stage_key(name, config, deps)
    record = _read_json(final / STAGE_FILE)
    if record is not None and record.get("key") == key:
      if self.progress is not None:
        self.progress.begin(name, cached=True)
        self.progress.end(name, 0.0, cached=True)
      self.log(f"[{name}] cached ({record.get('seconds', 0.0):.0f} s when it ran)")
      return StageResult(name, key, final, record["result"], True, record.get("seconds", 0.0))
    if self.progress is not None:
      self.progress.begin(name)
    if final.exists():
      reason = "its configuration changed" if record is not None else "it has no record"
      self.log(f"[{name}] redoing: {reason}")
      shutil.rmtree(final)
    previous_seconds = 0.0
    if work.exists():
      work_config = _read_json(work / WORK_CONFIG_FILE)
      if work_config is None or work_config.get("key") != key:
        shutil.rmtree(work)
      else:
        previous_seconds = float(work_config.get("seconds", 0.0))
        self.log(f"[{name}] resuming an interrupted attempt")
    work.mkdir(parents=True, exist_ok=True)
    work_config = {"name": name, "key": key, "config": dict(config),
                   "deps": {d.name: d.key for d in deps}, "seconds": previous_seconds}
    _write_json_atomic(work / WORK_CONFIG_FILE, work_config)
    self.log(f"[{name}] running")
    start = time.perf_counter()
    try:
      result = dict(fn(work))
    finally:
      # Time spent so far counts even when the attempt fails or is interrupted.
      work_config["seconds"] = previous_seconds + time.perf_counter() - start
      if work.exists():
        _write_json_atomic(work / WORK_CONFIG_FILE, work_config)
    seconds = work_config["seconds"]
    _canonical(result)  # refuse a result that cannot be recorded before renaming anything
    record = {"name": name, "key": key, "config": dict(config),
              "deps": {d.name: d.key for d in deps}, "result": result, "seconds": seconds,
              "finished": datetime.datetime.now(datetime.timezone.utc).isoformat(
                  timespec="seconds")}
    _write_json_atomic(work / STAGE_FILE, record)
    os.replace(work, final)
    self.executed.append(name)
    if self.progress is not None:
      self.progress.end(name, seconds - previous_seconds, cached=False)
    self.log(f"[{name}] done in {seconds:.0f} s")
    return StageResult(name, key, final, result, False, seconds)
