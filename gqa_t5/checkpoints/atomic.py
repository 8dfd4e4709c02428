"""Write a checkpoint directory or a file completely or not at all, and clean up after interrupted
writes.

Everything is written into a temporary directory `.NAME.tmp-*` beside the destination and renamed
into place at the end, so the destination is never half-written and an existing checkpoint is
never half-overwritten. Each temporary directory holds a marker file naming its process; a later
write to the same destination removes the temporary directories of dead processes (a SIGKILL
leaves one behind) and never touches a directory without our marker.

SIGINT and SIGTERM during the write do not interrupt it mid-tensor: the first one is noted, the
writers stop before their next tensor (`raise_if_interrupted`), every write in flight (Orbax's and
tensorstore's threads included) finishes, then the temporary directory is removed and
`Interrupted` (exit status 128 + signal) is raised. A second signal stops at once: a tensorstore
write in flight is cancelled and waited for (`wait_or_cancel`); whatever else it leaves, the next
write to the same destination removes.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import sys
import tempfile
import threading
from typing import IO, Any, Iterator, List, Optional

from gqa_t5.checkpoints.errors import CheckpointError, naming_the_file

MARKER = ".gqa_t5-partial.json"
_KINDS = ("tmp", "old")  # .NAME.tmp-*: a write in progress; .NAME.old-*: the replaced original
_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(KeyboardInterrupt):
  """A write stopped by SIGINT/SIGTERM; `exit_code` is the shell's 128 + signal number.

  `completed`: the signal came after the last tensor, and the destination was written whole.
  """

  def __init__(self, signum: int, completed: bool = False):
    super().__init__(f"interrupted by {signal.Signals(signum).name}")
    self.signum = signum
    self.exit_code = 128 + signum
    self.completed = completed


class _StopRequest:
  """The signal received during an atomic write (None: none)."""
  signum: Optional[int] = None


def raise_if_interrupted() -> None:
  """Writers call this before each tensor: raises Interrupted once a stop was asked for."""
  if _StopRequest.signum is not None:
    raise Interrupted(_StopRequest.signum)


def _on_signal(signum, frame):
  del frame
  if _StopRequest.signum is not None:
    raise Interrupted(signum)  # a second signal: stop now
  _StopRequest.signum = signum
  sys.stderr.write(f"gqa-t5: {signal.Signals(signum).name} received: stopping after the tensor "
                   "being written and removing the partial output (signal again to stop now)\n")


@contextlib.contextmanager
def _deferred_signals() -> Iterator[None]:
  """Turns SIGINT/SIGTERM into a stop request for the duration of the block (main thread)."""
  if threading.current_thread() is not threading.main_thread():
    yield  # only the main thread receives signals
    return
  # A signal the process ignores (nohup) stays ignored.
  previous = {s: signal.signal(s, _on_signal) for s in _SIGNALS
              if signal.getsignal(s) is not signal.SIG_IGN}
  _StopRequest.signum = None

  def restore() -> Optional[int]:
    for s, handler in previous.items():
      signal.signal(s, handler)
    pending, _StopRequest.signum = _StopRequest.signum, None
    return pending

  try:
    yield
  except BaseException:
    restore()
    raise
  pending = restore()
  if pending is not None:  # came after the last check: the write is complete, still stop
    raise Interrupted(pending, completed=True)


def wait_or_cancel(future) -> None:
  """A writer's future (tensorstore's): its result; if the wait is cut short (a forced stop),
  the write is cancelled and waited for, so no thread writes into a directory being removed."""
  try:
    future.result()
  except BaseException:
    future.cancel()
    with contextlib.suppress(BaseException):  # already unwinding: only settle the write
      future.exception(timeout=60)
    raise


def _process_start(pid: int) -> Optional[str]:
  """The start time of a process (Linux /proc), which tells a reused pid from the original."""
  try:
    with open(f"/proc/{pid}/stat") as f:
      return f.read().rsplit(")", 1)[1].split()[19]
  except (OSError, IndexError):
    return None


def process_owner() -> dict:
  """This process: pid, start time and host (what a marker or a lock file records)."""
  pid = os.getpid()
  return {"pid": pid, "start": _process_start(pid), "host": socket.gethostname()}


def _write_marker(directory: str, target: str) -> None:
  with open(os.path.join(directory, MARKER), "w") as f:
    json.dump(dict(process_owner(), target=target), f)


def owner_is_dead(marker: dict) -> bool:
  """Whether the writer that left `marker` is gone (False when in doubt: another host)."""
  if marker.get("host") != socket.gethostname():
    return False
  pid = marker.get("pid")
  if not isinstance(pid, int) or pid == os.getpid():
    return True  # our own pid: a previous process (we have no temporary directory yet)
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return True
  except PermissionError:
    pass  # alive, another user's
  start = marker.get("start")
  return start is not None and _process_start(pid) not in (None, start)


def _read_marker(directory: str) -> Optional[dict]:
  try:
    with open(os.path.join(directory, MARKER)) as f:
      marker = json.load(f)
  except (OSError, ValueError):
    return None
  return marker if isinstance(marker, dict) else None


def remove_stale_temporaries(path: str) -> List[str]:
  """Removes what interrupted writes to `path` left beside it; returns the removed directories.

  Only directories named `.NAME.tmp-*` / `.NAME.old-*` that hold our marker for this `path`,
  written by a process that no longer runs. An `.old-*` directory still holding the original
  checkpoint while `path` is missing (killed between the two renames of an overwrite) is put
  back as `path` first.
  """
  path = os.path.abspath(path)
  parent, name = os.path.split(path)
  removed = []
  try:
    entries = sorted(os.listdir(parent))
  except OSError:
    return removed
  prefixes = tuple(f".{name}.{kind}-" for kind in _KINDS)
  for entry in entries:
    candidate = os.path.join(parent, entry)
    if not entry.startswith(prefixes) or os.path.islink(candidate) or \
        not os.path.isdir(candidate):
      continue
    marker = _read_marker(candidate)
    if marker is None or marker.get("target") != path or not owner_is_dead(marker):
      continue
    original = os.path.join(candidate, name)
    if entry.startswith(prefixes[1]) and os.path.isdir(original) and not os.path.lexists(path):
      os.rename(original, path)
    shutil.rmtree(candidate, ignore_errors=True)
    removed.append(candidate)
  return removed


def _check_parent(path: str) -> None:
  if not os.path.isdir(os.path.dirname(path)):
    raise CheckpointError(f"parent directory of output path {path} does not exist")


def check_destination(path: str, overwrite: bool) -> None:
  """Refuses an existing destination unless `overwrite`; checks its parent exists."""
  path = os.path.abspath(path)
  if os.path.lexists(path) and not overwrite:
    raise CheckpointError(f"output path {path} already exists (pass --overwrite / "
                          "overwrite=True to replace it)")
  _check_parent(path)


def prepare_destination(path: str, overwrite: bool) -> List[str]:
  """Cleans up after interrupted writes to `path`, then `check_destination`; returns removals."""
  path = os.path.abspath(path)
  _check_parent(path)
  removed = remove_stale_temporaries(path)
  check_destination(path, overwrite)
  return removed


def _make_temporary(parent: str, name: str, kind: str, target: str) -> str:
  directory = tempfile.mkdtemp(prefix=f".{name}.{kind}-", dir=parent)
  _write_marker(directory, target)  # first thing in it: without it we never delete it
  return directory


def _publish(tmp: str, path: str, overwrite: bool) -> None:
  parent, name = os.path.split(path)
  os.sync()  # writers skip per-file fsync; flush once before the rename publishes the data
  if os.path.lexists(path):
    if not overwrite:
      raise CheckpointError(f"output path {path} appeared while writing; not replacing it")
    old = _make_temporary(parent, name, "old", path)
    os.rename(path, os.path.join(old, name))
    os.rename(tmp, path)
    shutil.rmtree(old, ignore_errors=True)
  else:
    os.rename(tmp, path)
  with contextlib.suppress(OSError):
    os.remove(os.path.join(path, MARKER))


@contextlib.contextmanager
def atomic_directory(path: str, overwrite: bool = False) -> Iterator[str]:
  """Yields a temporary directory that becomes `path` when the block succeeds.

  Stale temporary directories of earlier interrupted writes to `path` are removed first. A
  SIGINT/SIGTERM in the block raises `Interrupted` once the writers have stopped (see the module
  docstring); the temporary directory is gone by then.
  """
  path = os.path.abspath(path)
  prepare_destination(path, overwrite)
  parent, name = os.path.split(path)
  with _deferred_signals():
    tmp = _make_temporary(parent, name, "tmp", path)
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes it private; a checkpoint should not be
    try:
      yield tmp
      raise_if_interrupted()  # asked to stop: do not publish
      _publish(tmp, path, overwrite)
    except BaseException:
      shutil.rmtree(tmp, ignore_errors=True)
      raise


def _umask() -> int:
  """The process's umask. Linux reports it in /proc without changing it; elsewhere reading it
  means setting it and setting it back, a moment in which another thread's new file would get
  no umask at all."""
  try:
    with open("/proc/self/status", encoding="ascii", errors="replace") as status:
      for line in status:
        if line.startswith("Umask:"):
          return int(line.split()[1], 8)
  except (OSError, ValueError, IndexError):
    pass
  umask = os.umask(0)
  os.umask(umask)
  return umask


@contextlib.contextmanager
def open_for_keeps(path: os.PathLike, mode: str = "w", **open_kwargs) -> Iterator[IO]:
  """Opens a temporary file beside `path` for writing; on a clean exit it is flushed to disk and
  renamed over `path`, on an error it is removed. The one way the package writes a file meant to
  last: a reader never sees half a file, and a crash leaves the old one in place. A failed write,
  flush or sync (a full disk) raises an OSError naming `path` (`errors.naming_the_file`)."""
  path = os.fspath(path)
  directory = os.path.dirname(os.path.abspath(path))
  fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp",
                             dir=directory)
  try:
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes it private; open() would not
    with naming_the_file(path), os.fdopen(fd, mode, **open_kwargs) as f:
      yield f
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise


def write_text(path: os.PathLike, text: str) -> None:
  """Writes `text` to `path` all or nothing (`open_for_keeps`)."""
  with open_for_keeps(path, "w") as f:
    f.write(text)


def write_json(path: os.PathLike, value: Any, **dump_kwargs) -> None:
  """Writes `value` as JSON to `path` all or nothing; `dump_kwargs` go to `json.dump`."""
  with open_for_keeps(path, "w") as f:
    json.dump(value, f, **dump_kwargs)


def save_figure(fig, path: os.PathLike, **savefig_kwargs) -> None:
  """Saves a matplotlib figure as PNG to `path` all or nothing."""
  with open_for_keeps(path, "wb") as f:
    fig.savefig(f, format="png", **savefig_kwargs)
