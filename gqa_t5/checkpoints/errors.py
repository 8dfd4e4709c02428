"""The one exception type every checkpoint reader, writer and the converter raise."""


class CheckpointError(ValueError):
  """A checkpoint is missing, malformed or does not match what was asked for.

  The message always names the offending path, tensor, field or value.
  """
