"""What every reader returns: lazy tensors plus the step, format and inferred configuration."""

from __future__ import annotations

import dataclasses
from typing import Dict, Optional

import numpy as np

from gqa_t5.checkpoints import tree as tree_lib
from gqa_t5.checkpoints.lazy import LazyTensor
from gqa_t5.model.config import T5Config


@dataclasses.dataclass
class CheckpointSource:
  """An opened checkpoint: nothing but metadata is in memory until a tensor is read.

  Attributes:
    path: what was opened.
    format: 't5x', 'orbax', 'hf' or 'mesh-tf'.
    tensors: {'/'-joined T5X parameter name: LazyTensor}.
    step: the training step recorded in the checkpoint (0 when it has none).
    config: the T5Config implied by the tensor shapes (or given by the checkpoint).
  """

  path: str
  format: str
  tensors: Dict[str, LazyTensor]
  step: int = 0
  config: Optional[T5Config] = None

  def shapes(self) -> Dict[str, tuple]:
    return {name: t.shape for name, t in self.tensors.items()}

  def largest_tensor_bytes(self) -> int:
    return max((t.nbytes for t in self.tensors.values()), default=0)

  def read_all(self, dtype=None) -> Dict:
    """The whole parameter tree in memory (nested dicts of numpy arrays)."""
    flat = {}
    for name, tensor in self.tensors.items():
      value = tensor.read()
      flat[name] = value if dtype is None else value.astype(np.dtype(dtype))
    return tree_lib.unflatten(flat)


def finish(source: CheckpointSource, config: Optional[T5Config] = None,
           validate: bool = True) -> CheckpointSource:
  """Infers (or takes) the config and validates every tensor's presence and shape."""
  shapes = source.shapes()
  label = f"{source.format} checkpoint {source.path}"
  if config is None:
    config = source.config or tree_lib.infer_config(shapes, source=label)
  if validate:
    tree_lib.validate_shapes(shapes, config, source=label)
  source.config = config
  return source
