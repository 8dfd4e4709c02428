"""t5x's Adafactor state for a converted checkpoint, zeroed, at the shapes t5x gives it.

t5x restores INITIAL_CHECKPOINT_PATH into its whole train state: `serialization.from_state_dict`
wants every key its optimizer holds, so a checkpoint without `state/param_states` fails
("target dict contains keys {'param_states'}") unless the user adds a `fallback_to_scratch` /
`assignment_map` pair, and t5x does not check the shapes of optimizer leaves stored in the
msgpack file, so they must be exactly t5x's. The converter therefore writes, for every
parameter, what t5x's `Adafactor.init_param_state` creates: `v_row`/`v_col` (factored second
moments) or `v` (full), `m` when momentum is on, and (1,) placeholders for the rest, all zero
(the statistics of the source no longer fit the pooled key/value kernels, and zero is where
t5x's Adafactor starts them). Which dimensions are factored comes from the network's own
logical axes and `gqa_t5.optim`'s T5X factoring (T5.1.1's heuristic for unscanned 2-D kernels,
the logical factor rules for scanned ones), so scanned and unrolled trees both come out right.
"""

from __future__ import annotations

from typing import Dict, Mapping, Tuple

import jax

from gqa_t5 import optim, param_init, partitioning
from gqa_t5.checkpoints import tree as tree_lib
from gqa_t5.checkpoints.errors import CheckpointError
from gqa_t5.model.config import T5Config
from gqa_t5.model.network import Transformer
from gqa_t5.models import EncoderDecoderModel

_PLACEHOLDER = (1,)  # t5x's shape for a state leaf the parameter does not use
_LEAVES = ("v_row", "v_col", "v", "m")

Shape = Tuple[int, ...]


def model_shapes_and_axes(config: T5Config) -> Tuple[Dict[str, Shape], Dict[str, tuple]]:
  """({name: shape}, {name: logical axes}) of `Transformer(config)`'s parameters."""
  model = EncoderDecoderModel(Transformer(config))
  # The key is made inside the trace: shapes only, so no accelerator backend is started.
  variables = jax.eval_shape(lambda: model.get_initial_variables(jax.random.PRNGKey(0),
                                                                 param_init.INIT_SHAPES))
  shapes = {k: tuple(v.shape) for k, v in tree_lib.flatten(variables["params"]).items()}
  axes = partitioning.params_logical_axes(variables["params_axes"])
  return shapes, tree_lib.flatten(axes)


def check_layout(found: Mapping[str, Shape], expected: Mapping[str, Shape], what: str) -> None:
  """Raises CheckpointError naming every parameter whose presence or shape differs."""
  problems = [f"{n} missing" for n in sorted(set(expected) - set(found))]
  problems += [f"{n} is not a parameter of the network" for n in sorted(set(found) - set(expected))]
  problems += [f"{n} has shape {tuple(found[n])}, the network's is {tuple(expected[n])}"
               for n in sorted(set(found) & set(expected))
               if tuple(found[n]) != tuple(expected[n])]
  if problems:
    raise CheckpointError(f"{what} does not match gqa_t5's network: " + "; ".join(problems[:8])
                          + (f" (and {len(problems) - 8} more)" if len(problems) > 8 else ""))


def adafactor_state_shapes(config: T5Config, shapes: Mapping[str, Shape],
                           momentum: bool = False) -> Dict[str, Tuple[Shape, bool]]:
  """{'<param>/<v_row|v_col|v|m>': (shape, full)} for t5x's Adafactor with T5X's standard
  factor rules; `full` marks the leaves shaped like their parameter (t5x writes those with
  tensorstore, the rest inside the msgpack file). `shapes` must be `Transformer(config)`'s
  parameters exactly (CheckpointError otherwise: a layout t5x could not restore)."""
  expected, axes = model_shapes_and_axes(config)
  check_layout(shapes, expected, "the converted checkpoint")
  adafactor = optim.Adafactor(beta1=0.9 if momentum else None)
  states: Dict[str, Tuple[Shape, bool]] = {}
  for name, shape in expected.items():
    plan = adafactor.plan(shape, axes[name])
    leaves = {leaf: _PLACEHOLDER for leaf in _LEAVES}
    if plan.factored:
      leaves["v_row"] = tuple(s for d, s in enumerate(shape) if d not in plan.col_dims)
      leaves["v_col"] = tuple(s for d, s in enumerate(shape) if d not in plan.row_dims)
    else:
      leaves["v"] = shape
    if momentum:
      leaves["m"] = shape
    for leaf, leaf_shape in leaves.items():
      full = leaf in ("v", "m") and leaf_shape == shape and leaf_shape != _PLACEHOLDER
      states[f"{name}/{leaf}"] = (leaf_shape, full)
  return states
