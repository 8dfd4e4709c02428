"""Between T5X's scanned parameter layout (`layers` with a layer axis) and unrolled `layers_i`."""

from __future__ import annotations

from typing import Any, Dict

import numpy as np

# T5X's param_scan_axis: kernels become [in, layers, out], norm scales [dim, layers].
LAYER_AXIS = 1


def unstack_layers(params: Dict[str, Any]) -> Dict[str, Any]:
  """encoder/layers/... [.., L, ..] -> encoder/layers_i/... (and the decoder likewise)."""
  out = dict(params)
  for stack in ("encoder", "decoder"):
    if stack not in params or "layers" not in params[stack]:
      continue
    tree = dict(params[stack])
    scanned = tree.pop("layers")
    num_layers = _first_leaf(scanned).shape[LAYER_AXIS]
    for i in range(num_layers):
      tree[f"layers_{i}"] = _map(scanned, lambda x, i=i: x.take(i, axis=LAYER_AXIS))
    out[stack] = tree
  return out


def stack_layers(params: Dict[str, Any]) -> Dict[str, Any]:
  """encoder/layers_i/... -> encoder/layers/... with the layer axis at position 1."""
  out = dict(params)
  for stack in ("encoder", "decoder"):
    if stack not in params:
      continue
    tree = dict(params[stack])
    names = sorted((k for k in tree if k.startswith("layers_")), key=lambda k: int(k[7:]))
    if not names:
      continue
    layers = [tree.pop(k) for k in names]
    tree["layers"] = _map_many(layers, lambda xs: np.stack([np.asarray(x) for x in xs],
                                                           axis=LAYER_AXIS))
    out[stack] = tree
  return out


def _first_leaf(tree):
  while isinstance(tree, dict):
    tree = next(iter(tree.values()))
  return tree


def _map(tree, fn):
  return {k: _map(v, fn) if isinstance(v, dict) else fn(v) for k, v in tree.items()}


def _map_many(trees, fn):
  first = trees[0]
  return {k: _map_many([t[k] for t in trees], fn) if isinstance(first[k], dict)
          else fn([t[k] for t in trees]) for k in first}
