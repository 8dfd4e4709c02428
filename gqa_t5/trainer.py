"""The train state and the compiled, sharded steps that update it (T5X's `train_state` and
`Trainer`), on the model wrapper's loss.

`TrainState` is (step, float32 parameters, Adafactor state); checkpoints store its `to_dict()`.

`Trainer` works out the parameter and optimizer-state shapes abstractly (nothing is allocated
until `init_state`/`restore`), derives their shardings from the logical axes, and jits
  train_step(state, batch) -> (state, metrics)   dropout, z-loss and the loss normalising
                                                  factor come from the model; gradients are
                                                  accumulated over `num_microbatches`;
  eval_step(params, batch) -> metrics             teacher-forced, no dropout.
Dropout randomness is `fold_in(PRNGKey(seed), step)`: a step's result depends only on the
state and the batch, which is what makes resumed runs bitwise equal to uninterrupted ones.
Metrics are sums over the batch (loss, z_loss, weight_sum, accuracy_count, num_sequences);
`summarize` turns them into per-token figures.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Dict, Mapping, Optional, Tuple

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from gqa_t5 import aot
from gqa_t5 import optim
from gqa_t5 import param_init
from gqa_t5 import partitioning as partitioning_lib
from gqa_t5 import tpu_topology

Batch = Mapping[str, Any]


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
  def from_dict(cls, d: Mapping[str, Any]) -> "TrainState":
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


class NonFiniteLossError(FloatingPointError):
  """The loss, or the parameters/optimizer state after an update, became NaN or infinite."""


@dataclasses.dataclass
class Trainer:
  """Builds and runs the jitted steps for `model` on `partitioner`'s mesh.

  model: an `EncoderDecoderModel` (loss_fn, get_initial_variables, module.config).
  optimizer: `optim.Adafactor` hyper-parameters (with its learning-rate schedule).
  partitioner: mesh + logical rules.
  batch_spec: {feature: (global shape, dtype)} of a train batch.
  num_microbatches: gradient accumulation (None or 1: off).
  seed: dropout and initialisation seed.
  """
  model: Any
  optimizer: optim.Adafactor
  partitioner: partitioning_lib.Partitioner
  batch_spec: Mapping[str, Tuple[Tuple[int, ...], Any]]
  num_microbatches: Optional[int] = None
  seed: int = 0

  def __post_init__(self):
    config = getattr(self.model.module, "config", None)
    if config is not None:
      self.partitioner.setup_for(config)
    self.abstract_params, self.params_axes = partitioning_lib.abstract_params_and_axes(
        self.model)
    self.tx = self.optimizer.transform(self.params_axes)
    self.state_axes = logical_axes(self.optimizer, self.abstract_params, self.params_axes)
    self.state_shardings = self.partitioner.shardings(self.state_axes)
    self.params_shardings = self.state_shardings.params
    abstract_state = jax.eval_shape(lambda p: create(p, self.tx), self.abstract_params)
    self.abstract_state = jax.tree.map(
        lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
        abstract_state, self.state_shardings)
    self.batch_shardings = {k: self.partitioner.data_sharding(len(s))
                            for k, (s, _) in self.batch_spec.items()}
    self._train_step = None
    self._eval_step = None
    self._finite = None

  # --- state ------------------------------------------------------------------------------

  def init_state(self, step: int = 0) -> TrainState:
    """Randomly initialised parameters (seed `self.seed`, `param_init`: created already
    sharded) and a fresh optimizer state beside them."""
    with self.partitioner.mesh, self.partitioner.axis_rules():
      params = param_init.init_params(self.model, jax.random.PRNGKey(self.seed),
                                      self.params_shardings)
      return jax.jit(lambda p: create(p, self.tx, step), out_shardings=self.state_shardings,
                     donate_argnums=0)(params)

  def state_from_params(self, params, step: int = 0) -> TrainState:
    """Places host `params` (numpy tree) on the mesh and starts a fresh optimizer state."""
    def place(value, abstract, sharding):
      value = np.asarray(value, dtype=abstract.dtype)
      return jax.make_array_from_callback(value.shape, sharding, lambda idx: value[idx])
    device_params = jax.tree.map(place, params, self.abstract_params, self.params_shardings)
    with self.partitioner.mesh:
      return jax.jit(lambda p: create(p, self.tx, step),
                     out_shardings=self.state_shardings)(device_params)

  # --- steps ------------------------------------------------------------------------------

  def _grads_and_metrics(self, params, batch, rng):
    def loss_fn(p, b, r):
      loss, metrics = self.model.loss_fn(p, b, r)
      return loss, metrics
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    micro = self.num_microbatches or 1
    if micro == 1:
      (_, metrics), grads = grad_fn(params, batch, rng)
      return grads, metrics
    # Micro-batch i takes rows i, i+M, i+2M, ...: every data shard holds part of each one.
    def split(x):
      b = x.shape[0]
      x = x.reshape((b // micro, micro) + x.shape[1:]).swapaxes(0, 1)
      return jax.lax.with_sharding_constraint(
          x, NamedSharding(self.partitioner.mesh,
                           PartitionSpec(None, partitioning_lib.DATA,
                                         *([None] * (x.ndim - 2)))))
    micro_batches = jax.tree.map(split, dict(batch))
    first = jax.tree.map(lambda x: x[0], micro_batches)
    (_, m_shape), g_shape = jax.eval_shape(grad_fn, params, first, rng)
    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), (g_shape, m_shape))

    def body(carry, inputs):
      index, mb = inputs
      (_, metrics), grads = grad_fn(params, mb, jax.random.fold_in(rng, index))
      return jax.tree.map(jnp.add, carry, (grads, metrics)), None

    (grads, metrics), _ = jax.lax.scan(body, zeros, (jnp.arange(micro), micro_batches))
    return grads, metrics

  def _train_step_fn(self, state: TrainState, batch: Batch):
    rng = jax.random.fold_in(jax.random.PRNGKey(self.seed), state.step)
    grads, metrics = self._grads_and_metrics(state.params, batch, rng)
    lr = self.optimizer.learning_rate
    metrics = dict(metrics)
    metrics["learning_rate"] = (lr(state.step) if callable(lr) else jnp.float32(lr))
    new_state = apply_gradients(state, grads, self.tx)
    # Read with the other metrics (one step late): stops the run at the update that broke it.
    metrics["state_is_finite"] = all_finite((new_state.params, new_state.opt_state))
    return new_state, metrics

  def _eval_step_fn(self, params, batch: Batch):
    _, metrics = self.model.loss_fn(params, batch, None)
    return metrics

  def _jit_train_step(self):
    replicated = self.partitioner.replicated()
    return jax.jit(self._train_step_fn,
                   in_shardings=(self.state_shardings, self.batch_shardings),
                   out_shardings=(self.state_shardings, replicated),
                   donate_argnums=(0,))

  def train_step(self, state: TrainState, batch: Batch) -> Tuple[TrainState, Dict[str, Any]]:
    """One optimizer step on a global batch (dict of sharded arrays)."""
    if self._train_step is None:
      self._train_step = self._jit_train_step()
    with self.partitioner.mesh, self.partitioner.axis_rules():
      return self._train_step(state, batch)

  def eval_step(self, params, batch: Batch) -> Dict[str, Any]:
    if self._eval_step is None:
      self._eval_step = jax.jit(
          self._eval_step_fn, in_shardings=(self.params_shardings, self.batch_shardings),
          out_shardings=self.partitioner.replicated())
    with self.partitioner.mesh, self.partitioner.axis_rules():
      return self._eval_step(params, batch)

  def state_is_finite(self, state: TrainState) -> bool:
    """Whether every parameter and optimizer-state value is finite (checked on the devices by
    one jitted reduction; only a boolean comes back)."""
    if self._finite is None:
      self._finite = jax.jit(lambda s: all_finite((s.params, s.opt_state)),
                             in_shardings=(self.state_shardings,),
                             out_shardings=self.partitioner.replicated())
    with self.partitioner.mesh:
      return bool(jax.device_get(self._finite(state)))

  def shard_batch(self, host_batch: Batch) -> Dict[str, jax.Array]:
    """This host's rows -> global arrays (only the features the step uses)."""
    return self.partitioner.shard_batch({k: host_batch[k] for k in self.batch_spec})

  # --- dry run ----------------------------------------------------------------------------

  def lower_train_step(self):
    """The train step lowered from shapes alone (no parameters allocated), for the
    partitioner's devices: CPU devices, or a TPU slice described by `tpu_topology`."""
    abstract_batch = {k: jax.ShapeDtypeStruct(s, d, sharding=self.batch_shardings[k])
                      for k, (s, d) in self.batch_spec.items()}
    with self.partitioner.mesh, self.partitioner.axis_rules():
      return self._jit_train_step().lower(self.abstract_state, abstract_batch)

  def state_bytes_per_device(self) -> Dict[str, float]:
    """Bytes of parameters and optimizer state held by one device under the shardings."""
    def per_device(s):
      shard = s.sharding.shard_shape(s.shape)
      return float(np.prod(shard, dtype=np.float64) * np.dtype(s.dtype).itemsize)
    params = sum(per_device(s) for s in jax.tree.leaves(self.abstract_state.params))
    opt = sum(per_device(s) for s in jax.tree.leaves(self.abstract_state.opt_state))
    return {"params": params, "optimizer": opt}


def all_finite(tree) -> jnp.ndarray:
  """True when no floating-point leaf of `tree` holds NaN or infinity: one reduction, traced
  into whatever jit calls it (the train step, or `Trainer.state_is_finite`)."""
  leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)
            if jnp.issubdtype(x.dtype, jnp.inexact)]
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.bool_(True)


class DoesNotFitError(ValueError):
  """A dry run compiled for a TPU slice whose chips cannot hold the train step."""


def dry_run_report(trainer: Trainer, hbm_bytes: Optional[float] = None,
                   what: str = "the train step") -> Dict[str, float]:
  """Compiles the train step from shapes alone for the partitioner's devices; prints and
  returns the per-device figures. With `hbm_bytes` (a TPU slice's chip) a step that does not
  fit within `tpu_topology.HEADROOM_FRACTION` of it raises DoesNotFitError naming the bytes
  and what would make it fit."""
  t0 = time.perf_counter()
  figures = aot.compile_figures(trainer.lower_train_step())
  seconds = time.perf_counter() - t0
  state = trainer.state_bytes_per_device()
  report = {"compile_seconds": seconds, "params_bytes_per_device": state["params"],
            "optimizer_bytes_per_device": state["optimizer"]}
  report.update(argument_bytes=figures.argument_bytes, output_bytes=figures.output_bytes,
                alias_bytes=figures.alias_bytes, temp_bytes=figures.temp_bytes,
                peak_bytes_per_device=figures.peak_bytes, flops=figures.flops)
  data, model = trainer.partitioner.mesh_shape
  devices = trainer.partitioner.mesh.devices.flat
  first = next(iter(devices))
  lines = [f"dry run: mesh (data={data}, model={model}) on {data * model} "
           f"{getattr(first, 'device_kind', first.platform)} devices; compiled in {seconds:.1f}s",
           f"  parameters per device:       {aot.gib(state['params'])}",
           f"  optimizer state per device:  {aot.gib(state['optimizer'])}"]
  if figures.compiled:
    lines += [f"  step arguments per device:   {aot.gib(figures.argument_bytes)}",
              f"  temporaries per device:      {aot.gib(figures.temp_bytes)}",
              f"  estimated peak per device:   {aot.gib(figures.peak_bytes)}"
              " (the compiler's figure for these devices)"]
  print("\n".join(lines), flush=True)
  if hbm_bytes is not None:
    verdict = aot.check_fits(figures, hbm_bytes, tpu_topology.HEADROOM_FRACTION, what=what,
                             remedies=memory_remedies(trainer))
    print(f"  {verdict.text}", flush=True)
    report["fits"] = verdict.within_headroom
    if not verdict.within_headroom:
      raise DoesNotFitError(verdict.text)
  elif not figures.compiled:
    raise DoesNotFitError(f"{what} does not fit the devices: {figures.error}")
  return report


def memory_remedies(trainer: Trainer) -> list:
  """The gin settings that shrink a train step's memory, cheapest in step time first."""
  config = getattr(trainer.model.module, "config", None)
  out = []
  batch = next(iter(trainer.batch_spec.values()))[0][0]
  micro = trainer.num_microbatches or 1
  data = trainer.partitioner.mesh_shape[0]
  bigger = [m for m in (2, 4, 8, 16, 32) if m > micro and batch % (m * data) == 0]
  if config is not None and config.remat_policy == "none":
    out.append("--gin.REMAT_POLICY=\"'minimal'\" (recompute all but the weight matmuls)")
  if bigger:
    out.append(f"--gin.NUM_MICROBATCHES={bigger[0]} (or more: activations shrink with it)")
  if config is not None and config.remat_policy != "full":
    out.append("--gin.REMAT_POLICY=\"'full'\" (recompute each layer; about a third more "
               "compute)")
  if config is not None and not config.scan_layers:
    out.append("--gin.SCAN_LAYERS=True (one layer's buffers live at a time)")
  out.append("a larger MODEL_PARALLEL (parameters and optimizer state split further)")
  return out
