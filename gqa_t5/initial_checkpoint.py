"""INITIAL_CHECKPOINT_PATH, the checkpoint a run starts from: open any format the readers know,
check every tensor's shape against the configured model before anything is computed, read it.

A multi-head checkpoint can start a GQA/MQA run directly when `kv_conversion` is set ('mean'
is the paper's mean pooling of each group's key/value heads); the converter does the pooling.
Parameters only are taken from the checkpoint: the optimizer state starts fresh (its shapes
differ for converted key/value kernels, and checkpoints from other tools do not carry ours).

A checkpoint that lacks a parameter of the model, or holds it at another shape, is refused with
every such leaf named: silently starting those parameters from random values is how a scanned
or converted model ends up trained from scratch. `allow_fresh_params=True` (gin:
`train.allow_fresh_params = True`) is the explicit opt-in: those leaves are initialised
randomly and named in a warning. A scanned model (scan_layers) takes unrolled or scanned
checkpoints alike: the readers unstack a scanned one, and `open_for_model` stacks the layers
for a scanned model.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Dict, List, Mapping, Optional, Tuple

import jax
import numpy as np

from gqa_t5.checkpoints import detect
from gqa_t5.checkpoints import model_dir as model_dir_lib
from gqa_t5.checkpoints import scanned as scanned_lib
from gqa_t5.checkpoints import tree as tree_lib
from gqa_t5.convert import converter
from gqa_t5.convert import pooling


class InitialCheckpointError(ValueError):
  """The initial checkpoint does not fit the configured model."""


# One flatten/unflatten for the whole project: the checkpoint readers' (slash-joined names).
_flatten, _unflatten = tree_lib.flatten, tree_lib.unflatten

# The setting a message names: training's start (which may leave parameters fresh, opted in)
# or the checkpoint eval and infer decode with.
TRAINING = "INITIAL_CHECKPOINT_PATH"
EVALUATION = "CHECKPOINT_PATH"


def resolve_path(path: str) -> str:
  """A MODEL_DIR of ours stands for its latest checkpoint (MODEL_DIR/checkpoints/<step>)."""
  try:
    latest = model_dir_lib.latest_checkpoint_dir(path)
  except FileNotFoundError as error:
    raise InitialCheckpointError(str(error)) from None
  return latest or path


def _open_source(path: str, setting: str):
  path = resolve_path(path)
  if not os.path.exists(path) and "://" not in path:
    raise InitialCheckpointError(f"{setting} {path} does not exist")
  return detect.open_checkpoint(path, config=None, validate=False)


def open_for_model(path: str, config, kv_conversion: Optional[str] = None,
                   setting: str = TRAINING):
  """Opens `path` lazily (metadata only); converts key/value heads if asked and needed.
  `setting`: what errors call the path (TRAINING or EVALUATION)."""
  if kv_conversion is not None:
    if kv_conversion not in pooling.METHODS:
      raise InitialCheckpointError(f"unknown kv_conversion {kv_conversion!r}; use one of "
                                   f"{tuple(pooling.METHODS)} or None")
  try:
    source = _open_source(path, setting)
  except (FileNotFoundError, OSError) as error:
    raise InitialCheckpointError(f"{setting} {path}: {error}") from error
  if kv_conversion and config is not None and _needs_kv_conversion(source, config):
    spec = converter.ConversionSpec(num_kv_heads=config.self_attention_kv_heads,
                                    num_cross_kv_heads=config.cross_attention_kv_heads,
                                    method=kv_conversion)
    tensors, out_config, _ = converter.plan(source, spec)
    source = dataclasses.replace(source, tensors=tensors, config=out_config)
  if config is not None and config.scan_layers:
    source = dataclasses.replace(source, tensors=scanned_lib.stack(source.tensors))
  return source


def _needs_kv_conversion(source, config) -> bool:
  src = source.config
  if src is None:
    return False
  return (src.self_attention_kv_heads != config.self_attention_kv_heads
          or src.cross_attention_kv_heads != config.cross_attention_kv_heads)


def shape_problems(found: Mapping[str, Tuple[int, ...]],
                   expected: Mapping[str, Tuple[int, ...]]) -> List[str]:
  problems = []
  for name in sorted(expected):
    if name not in found:
      problems.append(f"tensor {name} {tuple(expected[name])} is missing from the checkpoint")
    elif tuple(found[name]) != tuple(expected[name]):
      problems.append(f"tensor {name} has shape {tuple(found[name])} in the checkpoint but the "
                      f"configured model needs {tuple(expected[name])}")
  for name in sorted(set(found) - set(expected)):
    problems.append(f"tensor {name} {tuple(found[name])} in the checkpoint is not a parameter "
                    f"of the configured model")
  return problems


def fresh_params(found: Mapping[str, Tuple[int, ...]],
                 expected: Mapping[str, Tuple[int, ...]]) -> List[str]:
  """The model's parameters that a checkpoint cannot provide: missing or of another shape."""
  return sorted(name for name in expected
                if name not in found or tuple(found[name]) != tuple(expected[name]))


def check_against(source, abstract_params, allow_fresh_params: bool = False,
                  setting: str = TRAINING) -> List[str]:
  """Raises InitialCheckpointError naming each tensor that is missing, of another shape, or
  not a parameter of the model. With `allow_fresh_params`, missing and mis-shaped parameters
  are allowed instead and returned (they are to be initialised randomly); a tensor the model
  does not have is refused all the same. `setting`: what the message calls the path; only
  training's (TRAINING) offers the pooling at load and the opt-in to fresh parameters."""
  expected = {k: tuple(v.shape) for k, v in _flatten(abstract_params).items()}
  found = {k: tuple(v) for k, v in source.shapes().items()}
  fresh = fresh_params(found, expected)
  problems = shape_problems(found, expected)
  if allow_fresh_params:
    problems = shape_problems({k: v for k, v in found.items() if k not in fresh},
                              {k: v for k, v in expected.items() if k not in fresh})
  if problems:
    shown = problems[:8]
    more = f" (and {len(problems) - 8} more)" if len(problems) > 8 else ""
    hint = ""
    training = setting == TRAINING
    if any("key/kernel" in p or "value/kernel" in p for p in problems):
      hint = (" If the checkpoint is multi-head and the model GQA/MQA, convert it first "
              "(gqa-t5 convert)" + (" or set kv_conversion='mean'." if training else "."))
    if fresh and not allow_fresh_params and training:
      hint += (f" Starting from it would leave {len(fresh)} parameter(s) freshly initialised; "
               "if that is meant, set train.allow_fresh_params = True (gin).")
    raise InitialCheckpointError(
        f"{setting} {source.path} does not match the configured model: "
        + "; ".join(shown) + more + "." + hint)
  return fresh


def read_params(source, abstract_params, skip=()) -> Dict[str, Any]:
  """The parameters as a nested dict of numpy arrays in the model's dtypes (`skip`: names
  not to read, e.g. `check_against`'s fresh parameters)."""
  expected = _flatten(abstract_params)
  flat = {}
  for name, tensor in source.tensors.items():
    if name in expected and name not in skip:
      flat[name] = np.asarray(tensor.read(), dtype=expected[name].dtype)
  return _unflatten(flat)


def merge_fresh(params: Mapping[str, Any], fresh_values: Mapping[str, Any],
                fresh: List[str]) -> Dict[str, Any]:
  """`params` (read from the checkpoint) completed with the `fresh` leaves of `fresh_values`
  (a randomly initialised tree of the same model)."""
  flat = _flatten(params)
  random = _flatten(fresh_values)
  flat.update({name: np.asarray(random[name]) for name in fresh})
  return _unflatten(flat)


def load_for_model(path: str, config, abstract_params, shardings,
                   kv_conversion: Optional[str] = None, setting: str = TRAINING):
  """(device parameters placed with `shardings`, step) from any checkpoint format; `setting`:
  what errors call the path."""
  source = open_for_model(path, config, kv_conversion, setting)
  check_against(source, abstract_params, setting=setting)
  params = read_params(source, abstract_params)

  def place(value, sharding):
    return jax.make_array_from_callback(value.shape, sharding, lambda idx: value[idx])
  return jax.tree.map(place, params, shardings), source.step
