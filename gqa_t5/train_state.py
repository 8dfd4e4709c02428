"""The train state (step, float32 parameters, Adafactor state) and its logical axes."""

from __future__ import annotations

from typing import Any, Dict

import flax.struct
import jax
import jax.numpy as jnp

from gqa_t5 import optim


@flax.struct.dataclass
class TrainState:
  """`step` is the global train step (it continues from a pre-trained checkpoint's step, as
  in T5X) and drives the learning rate; the optimizer's `count` counts the updates since its
  statistics were initialised (equal to `step` for a run from scratch)."""
  step: jnp.ndarray
  params: Any
  opt_state: optim.AdafactorState

  def to_dict(self) -> Dict[str, Any]:
    """A plain nested dict (what checkpoints store)."""
    return {"step": self.step, "params": self.params,
            "opt_state": {"count": self.opt_state.count, "stats": self.opt_state.stats}}

  @classmethod
  def from_dict(cls, d: Dict[str, Any]) -> "TrainState":
    return cls(step=d["step"], params=d["params"],
               opt_state=optim.AdafactorState(count=d["opt_state"]["count"],
                                              stats=d["opt_state"]["stats"]))


def create(params, tx, step: int = 0) -> TrainState:
  """`params` at global step `step` with a fresh optimizer state."""
  return TrainState(step=jnp.asarray(step, jnp.int32), params=params, opt_state=tx.init(params))


def logical_axes(optimizer: optim.Adafactor, params, params_axes) -> TrainState:
  """A TrainState whose leaves are the logical-axis tuples of the real state's leaves."""
  return TrainState(step=(), params=params_axes,
                    opt_state=optimizer.state_logical_axes(params, params_axes))


def apply_gradients(state: TrainState, grads, tx) -> TrainState:
  updates, opt_state = tx.update(grads, state.opt_state, state.params, step=state.step)
  params = jax.tree.map(lambda p, u: (p + u).astype(p.dtype), state.params, updates)
  return TrainState(step=state.step + 1, params=params, opt_state=opt_state)
