"""The one exception type every checkpoint reader, writer and the converter raise."""

from __future__ import annotations


class CheckpointError(ValueError):
  """A checkpoint is missing, malformed or does not match what was asked for.

  The message always names the offending path, tensor, field or value.
  """


def describe(error: BaseException) -> str:
  """'Type: message' of a library's exception, never empty (msgpack's FormatError has none)."""
  message = str(error) or "raised without a message"
  return f"{type(error).__name__}: {message}"
