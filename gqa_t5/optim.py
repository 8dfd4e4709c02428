"""Adafactor as T5X runs it, as an optax transformation (schedules: `gqa_t5.schedules`).

T5X's Adafactor (t5x/adafactor.py) with its T5.1.1 settings: factored second moments, decay
rate 0.8 (beta2 at step t is 1 - (t + 1)^-0.8), updates scaled by the parameter's RMS,
update clipping at RMS 1.0, epsilon1 1e-30, epsilon2 1e-3, no momentum.

Factored dimensions follow T5X: a parameter of rank <= 2 with no layer axis factors its two
largest dimensions when the smaller is >= 128 (`min_dim_size_to_factor`), else keeps a full `v`;
a scanned (layer axis) or rank > 2 parameter uses the logical factor rules
(`STANDARD_FACTOR_RULES`: 'embed' row, head/mlp/vocab columns, 'layers' a batch dimension, so
statistics, scale and clipping stay per layer), or without axes the two-largest-dims heuristic.
The state keeps {'v_row', 'v_col'} or {'v'} per parameter, plus `count` (updates since these
statistics started; it drives the decay). The schedule reads the global step when the caller
passes `step=`, else `count`: a fresh state on a pre-trained checkpoint restarts the decay
(beta2 = 0 at its first update, as T5X's `step_offset` does) while the learning rate follows
the global step.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, NamedTuple, Optional, Sequence, Tuple, Union

import jax
import jax.numpy as jnp
import numpy as np
import optax

from gqa_t5.schedules import Schedule
# The schedules lived here before `schedules.py`: these names keep gin files and code written
# against `optim.constant` / `optim.rsqrt_decay` / `optim.t5_schedule` working (the same
# functions, not copies).
from gqa_t5.schedules import constant, rsqrt_decay, t5_schedule  # noqa: F401  # pylint: disable=unused-import

# Factor roles of a logical axis.
ROW = "row"
COLUMN = "column"
BATCH = "batch"
NONE = "none"

STANDARD_FACTOR_RULES: Mapping[str, str] = {
    "vocab": COLUMN,
    "embed": ROW,
    "mlp": COLUMN,
    "heads": COLUMN,
    "kv": COLUMN,
    "joined_kv": COLUMN,
    "grouped_kv": COLUMN,
    "kv_heads": COLUMN,
    "relpos_buckets": NONE,
    "abspos_buckets": NONE,
    "layers": BATCH,
    "stack": BATCH,
    "mlp_activations": COLUMN,
}

LogicalAxes = Optional[Tuple[Optional[str], ...]]


class AdafactorState(NamedTuple):
  """`count`: updates since the statistics were initialised; `stats`: per-parameter moments."""
  count: jnp.ndarray
  stats: Any


@dataclasses.dataclass(frozen=True)
class FactorPlan:
  """How one parameter's second moment is stored.

  averaging_dims: dims the parameter scale and clipping RMS average over (all but batch dims).
  row_dims / col_dims: v_row keeps row_dims (averages g^2 over col_dims), v_col keeps col_dims;
    both empty when the parameter is not factored.
  """
  averaging_dims: Tuple[int, ...]
  row_dims: Tuple[int, ...] = ()
  col_dims: Tuple[int, ...] = ()

  @property
  def factored(self) -> bool:
    return bool(self.row_dims) and bool(self.col_dims)


@dataclasses.dataclass(frozen=True)
class Adafactor:
  """T5X's Adafactor hyper-parameters; `.transform()` gives the optax transformation.

  learning_rate: a float or a schedule `step -> lr` (`schedules.rsqrt_decay`, `schedules.constant`).
  decay_rate: second-moment decay exponent (beta2_t = 1 - (t + 1 - step_offset)^-decay_rate).
  step_offset: restart the decay schedule at this step (e.g. the start of fine-tuning).
  multiply_by_parameter_scale: scale updates by max(RMS(param), epsilon2).
  clipping_threshold: clip each update to this RMS (None: no clipping).
  beta1: momentum coefficient (None: no momentum, T5.1.1's setting).
  factored / min_dim_size_to_factor: factor second moments as described in the module doc.
  epsilon1: added to squared gradients; epsilon2: lower bound of the parameter scale.
  factor_rules: logical axis name -> ROW/COLUMN/BATCH/NONE (used with logical axes).
  """
  learning_rate: Union[float, Schedule] = 1e-3
  decay_rate: float = 0.8
  step_offset: int = 0
  multiply_by_parameter_scale: bool = True
  clipping_threshold: Optional[float] = 1.0
  beta1: Optional[float] = None
  factored: bool = True
  min_dim_size_to_factor: int = 128
  epsilon1: float = 1e-30
  epsilon2: float = 1e-3
  factor_rules: Mapping[str, str] = dataclasses.field(
      default_factory=lambda: dict(STANDARD_FACTOR_RULES))

  # --- factoring ------------------------------------------------------------------------

  def plan(self, shape: Sequence[int], axes: LogicalAxes = None) -> FactorPlan:
    """The factoring of a parameter of `shape` with logical `axes` (None: unknown)."""
    ndim = len(shape)
    all_dims = tuple(range(ndim))
    if not self.factored:
      return FactorPlan(all_dims)
    roles = None
    if axes is not None:
      if len(axes) != ndim:
        raise ValueError(f"logical axes {tuple(axes)} do not match parameter shape {tuple(shape)}")
      roles = tuple(self.factor_rules.get(a, NONE) if a is not None else NONE for a in axes)
    if roles is not None and (BATCH in roles or ndim > 2):
      batch_dims = tuple(d for d, r in enumerate(roles) if r == BATCH)
      averaging = tuple(d for d in all_dims if d not in batch_dims)
      rows = tuple(d for d, r in enumerate(roles) if r == ROW)
      cols = tuple(d for d, r in enumerate(roles) if r == COLUMN)
      if rows and cols and NONE in roles:
        raise ValueError(f"incomplete Adafactor factor rule for axes {tuple(axes)}: "
                         f"every non-batch axis must be a row or a column; roles {roles}")
      if not (rows and cols):
        return FactorPlan(averaging)
      return FactorPlan(averaging, rows, cols)
    # T5X's heuristic: the two largest dims, if the smaller of them is big enough.
    if ndim < 2:
      return FactorPlan(all_dims)
    order = np.argsort(shape, kind="stable")
    if shape[order[-2]] < self.min_dim_size_to_factor:
      return FactorPlan(all_dims)
    return FactorPlan(all_dims, (int(order[-2]),), (int(order[-1]),))

  def _plans(self, params, params_axes):
    if params_axes is None:
      return jax.tree.map(lambda p: self.plan(np.shape(p)), params)
    return jax.tree.map(lambda p, a: self.plan(np.shape(p), tuple(a)), params, params_axes,
                        is_leaf=_is_axes_leaf)

  # --- optax ----------------------------------------------------------------------------

  def transform(self, params_axes=None) -> optax.GradientTransformationExtraArgs:
    """The optax transformation; `params_axes` (a tree of logical-axis tuples, as the
    params) enables T5X's rule-based factoring of scanned parameters. Its update takes an
    optional `step=` (the global train step) for the learning-rate schedule."""

    def init_fn(params):
      plans = self._plans(params, params_axes)
      return AdafactorState(count=jnp.zeros([], jnp.int32),
                            stats=jax.tree.map(self._init_stats, params, plans))

    def update_fn(grads, state, params=None, *, step=None, **unused_extra_args):
      if params is None:
        raise ValueError("Adafactor needs the parameters (multiply_by_parameter_scale)")
      plans = self._plans(params, params_axes)
      count = state.count
      lr_step = count if step is None else step
      lr = self.learning_rate(lr_step) if callable(self.learning_rate) else self.learning_rate
      t = (count - self.step_offset).astype(jnp.float32) + 1.0
      decay = 1.0 - t ** (-self.decay_rate)

      def one(param, grad, stats, plan):
        return self._update_one(param, grad, stats, plan, lr, decay)

      flat_params, treedef = jax.tree.flatten(params)
      flat_grads = treedef.flatten_up_to(grads)
      flat_stats = treedef.flatten_up_to(state.stats)
      flat_plans = treedef.flatten_up_to(plans)
      out = [one(*args) for args in zip(flat_params, flat_grads, flat_stats, flat_plans)]
      updates = treedef.unflatten([u for u, _ in out])
      stats = treedef.unflatten([s for _, s in out])
      return updates, AdafactorState(count=count + 1, stats=stats)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)

  def _update_one(self, param, grad, stats, plan: FactorPlan, lr, decay):
    grad = grad.astype(jnp.float32)
    param32 = param.astype(jnp.float32)
    mixing = 1.0 - decay
    scale = lr
    if self.multiply_by_parameter_scale:
      rms = jnp.sqrt(jnp.mean(param32 * param32, axis=plan.averaging_dims, keepdims=True))
      scale = scale * jnp.maximum(rms, self.epsilon2)
    grad_sqr = grad * grad + self.epsilon1
    new_stats = {}
    if plan.factored:
      rows, cols = plan.row_dims, plan.col_dims
      v_row = decay * stats["v_row"] + mixing * jnp.mean(grad_sqr, axis=cols)
      v_col = decay * stats["v_col"] + mixing * jnp.mean(grad_sqr, axis=rows)
      # Row dims' positions once the column dims are removed (v_row's layout).
      rows_in_v_row = tuple(d - sum(c < d for c in cols) for d in rows)
      row_mean = jnp.mean(v_row, axis=rows_in_v_row, keepdims=True)
      row_factor = (v_row / row_mean) ** -0.5
      col_factor = v_col ** -0.5
      y = grad * jnp.expand_dims(row_factor, cols) * jnp.expand_dims(col_factor, rows)
      new_stats.update(v_row=v_row, v_col=v_col)
    else:
      v = decay * stats["v"] + mixing * grad_sqr
      y = grad * v ** -0.5
      new_stats["v"] = v
    if self.clipping_threshold is not None:
      y_rms = jnp.sqrt(jnp.mean(y * y, axis=plan.averaging_dims, keepdims=True))
      y = y / jnp.maximum(1.0, y_rms / self.clipping_threshold)
    subtrahend = scale * y
    if self.beta1 is not None:
      m = self.beta1 * stats["m"] + (1.0 - self.beta1) * subtrahend
      new_stats["m"] = m
      subtrahend = m
    return -subtrahend, new_stats

  def _init_stats(self, param, plan: FactorPlan):
    return _init_stats_impl(param, plan, self.beta1 is not None)

  def state_logical_axes(self, params, params_axes) -> AdafactorState:
    """Logical axes of the optimizer state (the parameter's axes minus reduced dims)."""
    if params_axes is None:
      params_axes = jax.tree.map(lambda p: (None,) * np.ndim(p), params)
    plans = self._plans(params, params_axes)

    def axes_of(p, a, plan: FactorPlan):
      a = tuple(a)
      out = {}
      if plan.factored:
        out["v_row"] = tuple(x for d, x in enumerate(a) if d not in plan.col_dims)
        out["v_col"] = tuple(x for d, x in enumerate(a) if d not in plan.row_dims)
      else:
        out["v"] = a
      if self.beta1 is not None:
        out["m"] = a
      return out

    stats = jax.tree.map(axes_of, params, params_axes, plans, is_leaf=_is_axes_leaf)
    return AdafactorState(count=(), stats=stats)


def _init_stats_impl(param, plan: FactorPlan, with_momentum: bool):
  shape = np.shape(param)
  if plan.factored:
    stats = {"v_row": jnp.zeros([s for d, s in enumerate(shape) if d not in plan.col_dims],
                                jnp.float32),
             "v_col": jnp.zeros([s for d, s in enumerate(shape) if d not in plan.row_dims],
                                jnp.float32)}
  else:
    stats = {"v": jnp.zeros(shape, jnp.float32)}
  if with_momentum:
    stats["m"] = jnp.zeros(shape, jnp.float32)
  return stats


def _is_axes_leaf(x) -> bool:
  return isinstance(x, tuple) and all(isinstance(a, (str, type(None))) for a in x)
