"""Write a checkpoint directory completely or not at all.

Everything is written into a temporary directory beside the destination and renamed into
place at the end; on any error the temporary directory is removed, so a failed write leaves
nothing behind and an existing checkpoint is never half-overwritten.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from typing import Iterator

from gqa_t5.checkpoints.errors import CheckpointError


def check_destination(path: str, overwrite: bool) -> None:
  """Refuses an existing destination unless `overwrite`; checks its parent exists."""
  path = os.path.abspath(path)
  if os.path.lexists(path) and not overwrite:
    raise CheckpointError(f"output path {path} already exists (pass --overwrite / "
                          "overwrite=True to replace it)")
  parent = os.path.dirname(path)
  if not os.path.isdir(parent):
    raise CheckpointError(f"parent directory of output path {path} does not exist")


@contextlib.contextmanager
def atomic_directory(path: str, overwrite: bool = False) -> Iterator[str]:
  """Yields a temporary directory that becomes `path` when the block succeeds."""
  path = os.path.abspath(path)
  check_destination(path, overwrite)
  parent, name = os.path.split(path)
  tmp = tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=parent)
  umask = os.umask(0)
  os.umask(umask)
  os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; a checkpoint should not be
  try:
    yield tmp
    os.sync()  # writers skip per-file fsync; flush once before the rename publishes the data
    if os.path.lexists(path):
      if not overwrite:
        raise CheckpointError(f"output path {path} appeared while writing; not replacing it")
      old = tempfile.mkdtemp(prefix=f".{name}.old-", dir=parent)
      os.rename(path, os.path.join(old, name))
      os.rename(tmp, path)
      shutil.rmtree(old, ignore_errors=True)
    else:
      os.rename(tmp, path)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
