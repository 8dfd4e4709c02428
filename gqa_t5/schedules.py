"""T5's learning-rate schedules: functions `step -> learning rate` for `optim.Adafactor`.

Each factor of T5X's `create_learning_rate_scheduler` is one named function here, and
`t5_schedule` multiplies the factors a factor string names, so each formula is written once.
The gin files configure them by these names (`schedules.rsqrt_decay`, `schedules.constant`).
"""

from __future__ import annotations

from typing import Callable, Dict

import jax.numpy as jnp

Schedule = Callable[[jnp.ndarray], jnp.ndarray]


def _check_warmup(name: str, warmup_steps: int) -> None:
  if warmup_steps <= 0:
    raise ValueError(f"{name} needs warmup_steps > 0, got {warmup_steps}")


def constant(value: float = 1e-3) -> Schedule:
  """Constant learning rate (T5's fine-tuning: 0.001)."""
  return lambda step: jnp.asarray(value, jnp.float32)


def linear_warmup(warmup_steps: int = 10_000) -> Schedule:
  """min(1, step / warmup_steps): a ramp from 0 to 1 over the first `warmup_steps` steps."""
  _check_warmup("linear_warmup", warmup_steps)

  def schedule(step):
    return jnp.minimum(1.0, jnp.asarray(step, jnp.float32) / warmup_steps)
  return schedule


def rsqrt_decay(base_learning_rate: float = 1.0, warmup_steps: int = 10_000) -> Schedule:
  """base / sqrt(max(step, warmup_steps)): T5's pre-training schedule (constant 0.01 for the
  first 10k steps, then inverse square root decay)."""
  _check_warmup("rsqrt_decay", warmup_steps)

  def schedule(step):
    step = jnp.asarray(step, jnp.float32)
    return base_learning_rate / jnp.sqrt(jnp.maximum(step, float(warmup_steps)))
  return schedule


def rsqrt_normalized_decay(warmup_steps: int = 10_000) -> Schedule:
  """`rsqrt_decay` scaled to 1 during the warm-up: sqrt(warmup_steps) / sqrt(max(step,
  warmup_steps))."""
  return rsqrt_decay(base_learning_rate=float(warmup_steps) ** 0.5, warmup_steps=warmup_steps)


def t5_schedule(factors: str = "constant * rsqrt_decay", base_learning_rate: float = 1.0,
                warmup_steps: int = 10_000) -> Schedule:
  """T5X's factor-string scheduler for the factors T5 uses: 'constant' (`base_learning_rate`),
  'linear_warmup', 'rsqrt_decay' (base 1), 'rsqrt_normalized_decay', joined by '*'; the
  schedule is their product."""
  known: Dict[str, Callable[[], Schedule]] = {
      "constant": lambda: constant(base_learning_rate),
      "linear_warmup": lambda: linear_warmup(warmup_steps),
      "rsqrt_decay": lambda: rsqrt_decay(base_learning_rate=1.0, warmup_steps=warmup_steps),
      "rsqrt_normalized_decay": lambda: rsqrt_normalized_decay(warmup_steps),
  }
  names = [f.strip() for f in factors.split("*") if f.strip()]
  for name in names:
    if name not in known:
      raise ValueError(f"unknown learning-rate factor {name!r} in {factors!r}; "
                       f"known: {tuple(known)}")
  parts = [known[name]() for name in names]

  def schedule(step):
    lr = jnp.asarray(1.0, jnp.float32)
    for part in parts:
      lr = lr * part(step)
    return lr
  return schedule
