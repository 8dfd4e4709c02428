"""What every reader returns: lazy tensors plus the step, format and inferred configuration."""

from __future__ import annotations

import dataclasses
from typing import Dict, Optional

import numpy as np

from gqa_t5.checkpoints import scanned as scanned_lib
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
    scanned: the checkpoint stacks its layers (T5X's scan_layers); `tensors` are unrolled all
      the same (`finish` unstacks them lazily).
  """

  path: str
  format: str
  tensors: Dict[str, LazyTensor]
  step: int = 0
  config: Optional[T5Config] = None
  scanned: bool = False

  def shapes(self) -> Dict[str, tuple]:
    return {name: t.shape for name, t in self.tensors.items()}

  def read_all(self, dtype=None) -> Dict:
    """The whole parameter tree in memory (nested dicts of numpy arrays)."""
    flat = {}
    for name, tensor in self.tensors.items():
      value = tensor.read()
      flat[name] = value if dtype is None else value.astype(np.dtype(dtype))
    return tree_lib.unflatten(flat)


def finish(source: CheckpointSource, config: Optional[T5Config] = None,
           validate: bool = True) -> CheckpointSource:
  """Infers (or takes) the config and validates every tensor's presence and shape; a scanned
  checkpoint's stacked layers are unstacked first (lazily), so every reader returns unrolled
  names."""
  if scanned_lib.is_scanned(source.tensors):
    source.tensors = scanned_lib.unstack(source.tensors)
    source.scanned = True
  shapes = source.shapes()
  label = f"{source.format} checkpoint {source.path}"
  if config is None:
    config = source.config or tree_lib.infer_config(shapes, source=label)
  if validate:
    tree_lib.validate_shapes(shapes, config, source=label)
  source.config = config
  return source
