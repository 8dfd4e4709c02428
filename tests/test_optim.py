"""Adafactor (T5X settings) against a hand-written numpy step; T5 schedules."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from gqa_t5 import optim, schedules


def _numpy_adafactor_step(param, grad, state, step, lr, factored_dims=None, decay_rate=0.8,
                          eps1=1e-30, eps2=1e-3, clip=1.0):
  """One T5X Adafactor step written out in float64 numpy (no momentum)."""
  param = param.astype(np.float64)
  grad = grad.astype(np.float64)
  beta2 = 1.0 - (step + 1.0) ** (-decay_rate)
  scale = lr * max(np.sqrt(np.mean(param ** 2)), eps2)
  g2 = grad ** 2 + eps1
  new_state = {}
  if factored_dims is not None:
    keep_row, keep_col = factored_dims  # v_row keeps dim keep_row, v_col keeps keep_col
    v_row = beta2 * state["v_row"] + (1 - beta2) * g2.mean(axis=keep_col)
    v_col = beta2 * state["v_col"] + (1 - beta2) * g2.mean(axis=keep_row)
    row_factor = (v_row / v_row.mean()) ** -0.5
    col_factor = v_col ** -0.5
    y = grad * np.expand_dims(row_factor, keep_col) * np.expand_dims(col_factor, keep_row)
    new_state = {"v_row": v_row, "v_col": v_col}
  else:
    v = beta2 * state["v"] + (1 - beta2) * g2
    y = grad / np.sqrt(v)
    new_state = {"v": v}
  y = y / max(1.0, np.sqrt(np.mean(y ** 2)) / clip)
  return param - scale * y, new_state


def _params_and_grads(seed=0):
  rng = np.random.default_rng(seed)
  params = {
      "kernel": rng.normal(size=(160, 256)).astype(np.float32),    # factored: 160 >= 128
      "wo": rng.normal(size=(256, 130)).astype(np.float32),        # factored, rows > cols
      "small": rng.normal(size=(8, 32)).astype(np.float32) * 1e-5,  # not factored; scale eps2
      "scale": rng.normal(size=(128,)).astype(np.float32),          # 1-D: full v
  }
  grads = [{k: rng.normal(size=v.shape).astype(np.float32) * (i + 1) for k, v in params.items()}
           for i in range(3)]
  return params, grads


def test_factoring_plan_matches_t5x_heuristic():
  opt = optim.Adafactor()
  assert opt.plan((160, 256)) == optim.FactorPlan((0, 1), (0,), (1,))
  assert opt.plan((256, 130)) == optim.FactorPlan((0, 1), (1,), (0,))
  assert not opt.plan((8, 32)).factored          # second-largest dim < 128
  assert not opt.plan((127, 4096)).factored
  assert not opt.plan((512,)).factored
  # A scanned kernel [layers, embed, mlp]: per-layer statistics from the logical rules.
  plan = opt.plan((4, 128, 256), ("layers", "embed", "mlp"))
  assert plan == optim.FactorPlan((1, 2), (1,), (2,))
  # A scanned layer-norm scale [layers, embed]: not factored, averaged per layer.
  assert opt.plan((4, 128), ("layers", "embed")) == optim.FactorPlan((1,))


def test_three_steps_match_numpy_reference():
  params, grads = _params_and_grads()
  lr_fn = schedules.t5_schedule("constant", base_learning_rate=0.01)
  tx = optim.Adafactor(learning_rate=lr_fn).transform()
  state = tx.init(jax.tree.map(jnp.asarray, params))
  assert set(state.stats["kernel"]) == {"v_row", "v_col"}
  assert state.stats["kernel"]["v_row"].shape == (160,)
  assert state.stats["kernel"]["v_col"].shape == (256,)
  assert state.stats["wo"]["v_row"].shape == (130,)
  assert state.stats["wo"]["v_col"].shape == (256,)
  assert set(state.stats["small"]) == {"v"}

  ref_params = {k: v.astype(np.float64) for k, v in params.items()}
  ref_state = {k: jax.tree.map(lambda x: np.zeros(x.shape), dict(state.stats[k]))
               for k in params}
  dims = {"kernel": (0, 1), "wo": (1, 0), "small": None, "scale": None}
  jax_params = jax.tree.map(jnp.asarray, params)
  update = jax.jit(tx.update)
  for step, grad in enumerate(grads):
    updates, state = update(jax.tree.map(jnp.asarray, grad), state, jax_params)
    jax_params = optax.apply_updates(jax_params, updates)
    for k in params:
      ref_params[k], ref_state[k] = _numpy_adafactor_step(
          ref_params[k], grad[k], ref_state[k], step, 0.01, dims[k])
  assert int(state.count) == 3
  for k in params:
    np.testing.assert_allclose(np.asarray(jax_params[k]), ref_params[k], rtol=1e-5, atol=1e-7)
    for name, value in ref_state[k].items():
      np.testing.assert_allclose(np.asarray(state.stats[k][name]), value, rtol=1e-4)
  # The update really moved every parameter (and the tiny one by ~lr * eps2 per step).
  for k in params:
    assert not np.allclose(np.asarray(jax_params[k]), params[k])


def test_first_step_update_is_clipped_to_lr_times_param_rms():
  # At step 0 beta2 = 0, so v = g^2 and y = sign(g): RMS 1, no clipping; the update is
  # exactly lr * RMS(param) * sign(g) for an unfactored parameter.
  p = jnp.full((4, 4), 2.0)
  g = jnp.asarray(np.random.default_rng(1).normal(size=(4, 4)), jnp.float32)
  tx = optim.Adafactor(learning_rate=0.1).transform()
  updates, _ = tx.update(g, tx.init(p), p)
  np.testing.assert_allclose(np.asarray(updates), -0.1 * 2.0 * np.sign(np.asarray(g)), rtol=1e-5)


def test_scanned_parameters_keep_per_layer_statistics():
  # Two stacked layers with very different scales behave as two separate parameters.
  rng = np.random.default_rng(2)
  layer_a = rng.normal(size=(128, 256)).astype(np.float32)
  layer_b = 100 * rng.normal(size=(128, 256)).astype(np.float32)
  grad_a = rng.normal(size=(128, 256)).astype(np.float32)
  grad_b = rng.normal(size=(128, 256)).astype(np.float32) * 3
  stacked = jnp.stack([layer_a, layer_b])
  stacked_grad = jnp.stack([grad_a, grad_b])
  opt = optim.Adafactor(learning_rate=0.01)
  tx_scan = opt.transform(params_axes=("layers", "embed", "mlp"))
  up_scan, _ = tx_scan.update(stacked_grad, tx_scan.init(stacked), stacked)
  tx = opt.transform()
  up_a, _ = tx.update(jnp.asarray(grad_a), tx.init(jnp.asarray(layer_a)), jnp.asarray(layer_a))
  up_b, _ = tx.update(jnp.asarray(grad_b), tx.init(jnp.asarray(layer_b)), jnp.asarray(layer_b))
  np.testing.assert_allclose(np.asarray(up_scan[0]), np.asarray(up_a), rtol=1e-5)
  np.testing.assert_allclose(np.asarray(up_scan[1]), np.asarray(up_b), rtol=1e-5)


def test_state_logical_axes_drop_reduced_dims():
  opt = optim.Adafactor()
  params = {"q": jnp.zeros((128, 256)), "s": jnp.zeros((128,))}
  axes = {"q": ("embed", "joined_kv"), "s": ("embed",)}
  state_axes = opt.state_logical_axes(params, axes)
  assert state_axes.stats["q"] == {"v_row": ("embed",), "v_col": ("joined_kv",)}
  assert state_axes.stats["s"] == {"v": ("embed",)}
  assert state_axes.count == ()


def test_momentum_option():
  p = jnp.ones((4,))
  tx = optim.Adafactor(learning_rate=0.1, beta1=0.9).transform()
  state = tx.init(p)
  assert set(state.stats) == {"v", "m"}
  updates, state = tx.update(jnp.ones((4,)), state, p)
  # m = 0.1 * subtrahend; subtrahend = lr * 1 * 1
  np.testing.assert_allclose(np.asarray(updates), -0.1 * 0.1 * np.ones(4), rtol=1e-6)


def test_schedules():
  rsqrt = schedules.rsqrt_decay(warmup_steps=10_000)
  assert float(rsqrt(0)) == pytest.approx(0.01)
  assert float(rsqrt(10_000)) == pytest.approx(0.01)
  assert float(rsqrt(40_000)) == pytest.approx(0.005)
  assert float(rsqrt(1_000_000)) == pytest.approx(0.001)
  assert float(schedules.constant(0.001)(123)) == pytest.approx(0.001)
  t5 = schedules.t5_schedule("constant * rsqrt_decay", 1.0, 10_000)
  for step in (0, 5000, 20_000, 1_000_000):
    assert float(t5(step)) == pytest.approx(float(rsqrt(step)))
  warm = schedules.t5_schedule("constant * linear_warmup", 2.0, 100)
  assert float(warm(50)) == pytest.approx(1.0)
  with pytest.raises(ValueError, match="unknown learning-rate factor 'cosine'"):
    schedules.t5_schedule("constant * cosine")


def test_learning_rate_schedule_reads_the_step_count():
  p = jnp.full((3,), 1.0)
  tx = optim.Adafactor(learning_rate=lambda step: 0.1 * (step + 1)).transform()
  state = tx.init(p)
  first, state = tx.update(jnp.ones(3), state, p)
  second, state = tx.update(jnp.ones(3), state, p)
  # Step 0: lr 0.1; step 1: lr 0.2 (update direction and scale are otherwise identical).
  np.testing.assert_allclose(np.asarray(second), 2 * np.asarray(first), rtol=1e-6)


def test_global_step_drives_the_learning_rate_and_count_the_decay():
  # A fresh state on a checkpoint at step 10**6: the learning rate follows the global step
  # while beta2 restarts at 0 (v = g^2 at the first update, as T5X's step_offset).
  p = jnp.full((4,), 3.0)
  g = jnp.asarray([1.0, -2.0, 0.5, 4.0])
  tx = optim.Adafactor(learning_rate=schedules.rsqrt_decay()).transform()
  state = tx.init(p)
  updates, state = tx.update(g, state, p, step=jnp.asarray(10**6))
  np.testing.assert_allclose(np.asarray(updates), -0.001 * 3.0 * np.sign(np.asarray(g)),
                             rtol=1e-5)
  assert int(state.count) == 1
  np.testing.assert_allclose(np.asarray(state.stats["v"]), np.asarray(g) ** 2, rtol=1e-6)

