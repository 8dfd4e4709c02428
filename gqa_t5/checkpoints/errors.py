"""The one exception type every checkpoint reader, writer and the converter raise."""

from __future__ import annotations

import contextlib
from typing import Iterator


class CheckpointError(ValueError):
  """A checkpoint is missing, malformed or does not match what was asked for.

  The message always names the offending path, tensor, field or value.
  """


def describe(error: BaseException) -> str:
  """'Type: message' of a library's exception, never empty (msgpack's FormatError has none)."""
  message = str(error) or "raised without a message"
  return f"{type(error).__name__}: {message}"


@contextlib.contextmanager
def naming_the_file(path: str) -> Iterator[None]:
  """A failed write, flush or sync of an open file (a full disk, a file-size limit) raises an
  OSError that names no file: re-raised here naming `path`, so the one-line report says which."""
  try:
    yield
  except OSError as error:
    if error.filename is None and error.errno is not None:
      raise OSError(error.errno, error.strerror, path) from error
    raise


def describe_os_error(error: OSError) -> str:
  """An OSError from the system as 'PATH: cause' ('/x/run: Read-only file system'), the way a
  user needs it; others as their message."""
  if error.strerror and error.filename:
    also = f" -> {error.filename2}" if error.filename2 else ""
    return f"{error.filename}{also}: {error.strerror}"
  return str(error) or type(error).__name__
