"""Lazy views between T5X's scanned layer layout and the unrolled one, tensor by tensor.

A scanned checkpoint (T5X's `scan_layers`) holds one stacked tensor per layer parameter,
`encoder/layers/<leaf>` with the layer axis at `scanning.LAYER_AXIS`; an unrolled one holds
`encoder/layers_<i>/<leaf>`. The readers, the converter and the initial-checkpoint check work on
unrolled names, so a scanned source is unstacked on opening (`unstack`) and a scanned output
stacked on writing (`stack`), both lazily: a stacked tensor is read once and sliced for every
layer, then released, and a stacked output tensor is built only when the writer asks for it.
"""

from __future__ import annotations

import re
from typing import Dict, List, Mapping

import numpy as np

from gqa_t5.checkpoints.errors import CheckpointError
from gqa_t5.checkpoints.lazy import LazyTensor
from gqa_t5.model.scanning import LAYER_AXIS

_STACKED = re.compile(r"^(encoder|decoder)/layers/(.+)$")
_UNROLLED = re.compile(r"^(encoder|decoder)/layers_(\d+)/(.+)$")


def is_scanned(names) -> bool:
  """Whether a flat tensor mapping holds stacked (scanned) layers."""
  return any(_STACKED.match(name) for name in names)


class _Slices:
  """One stacked tensor, read on the first slice asked for and dropped after the last."""

  def __init__(self, tensor: LazyTensor, num_layers: int):
    self._tensor, self._pending = tensor, set(range(num_layers))
    self._value = None

  def get(self, i: int) -> np.ndarray:
    if self._value is None:
      self._value = self._tensor.read()
    value = np.take(self._value, i, axis=LAYER_AXIS)
    self._pending.discard(i)
    if not self._pending:
      self._value = None
    return value


def unstack(tensors: Mapping[str, LazyTensor]) -> Dict[str, LazyTensor]:
  """`stack/layers/<leaf>` [.., L, ..] -> `stack/layers_<i>/<leaf>`; other tensors unchanged.

  Raises CheckpointError when a stack mixes both layouts or its stacked tensors disagree on L.
  """
  out: Dict[str, LazyTensor] = {}
  layers: Dict[str, int] = {}
  for name, tensor in tensors.items():
    match = _STACKED.match(name)
    if not match:
      out[name] = tensor
      continue
    stack, leaf = match.groups()
    if tensor.ndim <= LAYER_AXIS:
      raise CheckpointError(f"scanned tensor {name} has shape {tensor.shape}: no layer axis "
                            f"{LAYER_AXIS}")
    num_layers = tensor.shape[LAYER_AXIS]
    if layers.setdefault(stack, num_layers) != num_layers:
      raise CheckpointError(f"scanned tensor {name} has {num_layers} layers, other "
                            f"{stack} tensors {layers[stack]}")
    shape = tensor.shape[:LAYER_AXIS] + tensor.shape[LAYER_AXIS + 1:]
    slices = _Slices(tensor, num_layers)
    for i in range(num_layers):
      sliced = f"{stack}/layers_{i}/{leaf}"
      out[sliced] = LazyTensor(sliced, shape, tensor.dtype, lambda i=i, s=slices: s.get(i))
  mixed = sorted({m.group(1) for m in map(_UNROLLED.match, tensors) if m} & set(layers))
  if mixed:
    raise CheckpointError(f"the {' and '.join(mixed)} holds both stacked 'layers' and "
                          "unrolled 'layers_<i>' tensors")
  return out


def stack(tensors: Mapping[str, LazyTensor]) -> Dict[str, LazyTensor]:
  """`stack/layers_<i>/<leaf>` -> `stack/layers/<leaf>` with the layer axis at LAYER_AXIS
  (T5X's scanned layout); other tensors unchanged. Every layer must hold the same leaves."""
  out: Dict[str, LazyTensor] = {}
  groups: Dict[str, Dict[int, LazyTensor]] = {}
  for name, tensor in tensors.items():
    match = _UNROLLED.match(name)
    if match:
      stack_name, i, leaf = match.groups()
      groups.setdefault(f"{stack_name}/layers/{leaf}", {})[int(i)] = tensor
    else:
      out[name] = tensor
  counts = {name.split("/")[0]: set() for name in groups}
  for name, by_layer in groups.items():
    counts[name.split("/")[0]].add(len(by_layer))
    if sorted(by_layer) != list(range(len(by_layer))):
      raise CheckpointError(f"cannot stack {name}: layers {sorted(by_layer)} are not 0..L-1")
  for stack_name, sizes in counts.items():
    if len(sizes) != 1:
      raise CheckpointError(f"cannot stack the {stack_name}'s layers: their parameters appear "
                            f"in different numbers of layers {sorted(sizes)}")
  for name, by_layer in groups.items():
    parts: List[LazyTensor] = [by_layer[i] for i in range(len(by_layer))]
    first = parts[0]
    if any(p.shape != first.shape for p in parts):
      raise CheckpointError(f"cannot stack {name}: layer shapes differ "
                            f"{sorted({p.shape for p in parts})}")
    shape = first.shape[:LAYER_AXIS] + (len(parts),) + first.shape[LAYER_AXIS:]
    out[name] = LazyTensor(name, shape, first.dtype,
                           lambda parts=parts: np.stack([p.read() for p in parts],
                                                        axis=LAYER_AXIS))
  return out
