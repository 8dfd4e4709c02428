"""Device mesh, logical axis rules and start-up checks for data and model parallelism.

The mesh has two axes, 'data' (batch) and 'model' (heads, MLP and vocabulary), as T5X's
`PjitPartitioner`. Parameters and activations carry logical axis names (T5X's plus
'grouped_kv' and 'kv_heads' for the K key/value heads); `standard_logical_axis_rules` maps them
to mesh axes, sharding the key/value heads only when K is a multiple of the model axis (see
model/axes.py, where the names, the rules tables and `check_rules_cover` live). A `Partitioner`
refuses rules that miss an axis instead of leaving that array unsharded.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
from typing import Any, List, Optional, Sequence, Tuple

import flax
import jax
import numpy as np
from flax.linen import partitioning as nn_partitioning
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from gqa_t5 import param_init
# The rules tables and their check live with the axis names (model/axes.py); re-exported here.
from gqa_t5.model.axes import (DATA, KV_HEAD_AXES, MODEL, T5X_STANDARD_RULES,  # noqa: F401
                               LogicalAxisError, LogicalRules, check_rules_cover, is_axes,
                               kv_head_rules, kv_heads_shardable, kv_heads_sharded,
                               logical_axis_names, standard_logical_axis_rules)


class PartitioningError(ValueError):
  """A mesh or batch layout that cannot work with the configured model."""


def create_mesh(data: int = -1, model: int = 1,
                devices: Optional[Sequence[Any]] = None) -> Mesh:
  """A ('data', 'model') mesh; `data=-1` takes all devices not used by the model axis."""
  devices = list(jax.devices() if devices is None else devices)
  data, model = resolve_mesh_shape(data, model, len(devices))
  try:
    from jax.experimental import mesh_utils
    grid = mesh_utils.create_device_mesh((data, model), devices=devices)
  except Exception:  # pylint: disable=broad-except  # CPU or unusual topologies
    grid = np.asarray(devices).reshape(data, model)
  return Mesh(grid, (DATA, MODEL))


def _divisors(n: int) -> List[int]:
  return [d for d in range(1, n + 1) if n % d == 0]


def resolve_mesh_shape(data: int, model: int, num_devices: int) -> Tuple[int, int]:
  """(data, model) with -1 filled in; raises PartitioningError naming what would work."""
  if model is None or model < 1 or (data is not None and data != -1 and data < 1):
    raise PartitioningError(f"mesh sizes must be positive (data may be -1), got data={data}, "
                            f"model={model}")
  if num_devices % model:
    raise PartitioningError(
        f"model axis size {model} does not divide the {num_devices} available devices; "
        f"model axis sizes that would work: {_divisors(num_devices)}")
  if data in (-1, None):
    data = num_devices // model
  if data * model != num_devices:
    raise PartitioningError(
        f"mesh (data={data}, model={model}) needs {data * model} devices but "
        f"{num_devices} are available; with model={model} use data={num_devices // model} "
        f"(or data=-1)")
  return data, model


def valid_model_axis_sizes(config, num_devices: int) -> List[int]:
  """Model axis sizes that split heads, MLP and vocabulary evenly on `num_devices`."""
  return [m for m in _divisors(num_devices)
          if config.num_heads % m == 0 and config.mlp_dim % m == 0
          and config.vocab_size % m == 0]


def validate(config, mesh_shape: Tuple[int, int], batch_size: Optional[int] = None,
             num_microbatches: Optional[int] = None, process_count: int = 1) -> str:
  """Checks that `config` (a T5Config) can run on a (data, model) mesh; returns a one-line
  description of the key/value-head layout. Raises PartitioningError saying why not and what
  would work."""
  data, model = mesh_shape
  num_devices = data * model
  problems = []
  for field in ("num_heads", "mlp_dim", "vocab_size"):
    value = getattr(config, field)
    if value % model:
      problems.append(f"{field}={value} is not a multiple of the model axis size {model}")
  if problems:
    ok = valid_model_axis_sizes(config, num_devices)
    raise PartitioningError(
        "cannot shard the model over a model axis of size "
        f"{model}: " + "; ".join(problems) + f". Model axis sizes that would work on "
        f"{num_devices} devices: {ok}")
  if batch_size is not None:
    micro = num_microbatches or 1
    if batch_size % micro:
      raise PartitioningError(
          f"batch size {batch_size} is not a multiple of num_microbatches={micro}; "
          f"num_microbatches that would work: {[m for m in _divisors(batch_size)]}")
    per_micro = batch_size // micro
    if per_micro % data:
      good = [d for d in _divisors(num_devices) if per_micro % d == 0]
      raise PartitioningError(
          f"each micro-batch of {per_micro} examples (batch {batch_size} / {micro} "
          f"micro-batches) cannot be split over a data axis of size {data}; use a batch size "
          f"that is a multiple of {data * micro}, or a data axis size in {good}")
    if batch_size % process_count:
      raise PartitioningError(
          f"batch size {batch_size} is not a multiple of the {process_count} processes "
          f"(each host reads batch_size / process_count examples)")
  return describe_kv_layout(config, model)


def describe_kv_layout(config, model_axis_size: int) -> str:
  """How the key/value heads are laid out on the model axis, for the start-up log."""
  k_self, k_cross = config.self_attention_kv_heads, config.cross_attention_kv_heads
  ks = sorted({k_self, k_cross})
  if kv_heads_sharded(k_self, k_cross, model_axis_size):
    return (f"key/value heads K={k_self} (cross K={k_cross}) sharded over model axis "
            f"{model_axis_size}")
  good = [m for m in _divisors(config.num_heads) if all(k % m == 0 for k in ks)]
  return (f"key/value heads K={k_self} (cross K={k_cross}) are not a multiple of the model "
          f"axis size {model_axis_size}: they are replicated on every model shard (query "
          f"heads stay sharded); model axis sizes that would shard them: {good}")


def params_logical_axes(params_axes) -> Any:
  """The `params_axes` collection (flax `param_with_axes`) as a tree of name tuples."""
  specs = flax.core.unfreeze(nn_partitioning.get_axis_names(params_axes))
  return jax.tree.map(tuple, specs, is_leaf=lambda x: isinstance(x, PartitionSpec))


def abstract_params_and_axes(model) -> Tuple[Any, Any]:
  """(parameter ShapeDtypeStructs, logical-axis tuples) of an `EncoderDecoderModel`.

  The one place that works out a model's parameters without allocating them. A module that
  declares no logical axes gets fully replicated ones (with a warning).
  """
  variables = jax.eval_shape(
      lambda rng: model.get_initial_variables(rng, param_init.INIT_SHAPES), jax.random.PRNGKey(0))
  abstract = variables["params"]
  if "params_axes" in variables:
    return abstract, params_logical_axes(variables["params_axes"])
  logging.warning("the model declares no logical axes: parameters are replicated")
  return abstract, jax.tree.map(lambda p: (None,) * len(p.shape), abstract)


@dataclasses.dataclass
class Partitioner:
  """A mesh plus logical rules: turns logical axes into shardings and host data into arrays.

  data_parallel / model_parallel: mesh sizes (data=-1: all remaining devices).
  rules: logical axis rules; None builds `standard_logical_axis_rules` for the model's K.
  """
  data_parallel: int = -1
  model_parallel: int = 1
  rules: Optional[LogicalRules] = None
  devices: Optional[Sequence[Any]] = None

  @functools.cached_property
  def mesh(self) -> Mesh:
    # Built on first use, so configuring a Partitioner (e.g. by gin) needs no devices yet.
    return create_mesh(self.data_parallel, self.model_parallel, self.devices)

  @property
  def mesh_shape(self) -> Tuple[int, int]:
    return self.mesh.shape[DATA], self.mesh.shape[MODEL]

  def setup_for(self, config) -> "Partitioner":
    """Chooses rules for `config`'s key/value heads unless rules were given."""
    if self.rules is None:
      self.rules = standard_logical_axis_rules(
          config.self_attention_kv_heads, config.cross_attention_kv_heads,
          self.mesh.shape[MODEL])
    return self

  def _rules(self) -> LogicalRules:
    return self.rules if self.rules is not None else standard_logical_axis_rules(
        model_axis_size=self.mesh.shape[MODEL])

  def axis_rules(self):
    """Context manager that activates the rules for `nn.with_logical_constraint`."""
    return nn_partitioning.axis_rules(self._rules())

  def logical_to_spec(self, axes) -> PartitionSpec:
    return nn_partitioning.logical_to_mesh_axes(tuple(axes), self._rules())

  def sharding(self, axes) -> NamedSharding:
    return NamedSharding(self.mesh, self.logical_to_spec(axes))

  def shardings(self, axes_tree) -> Any:
    """A tree of NamedShardings for a tree of logical-axis tuples; an axis the rules do not
    cover raises LogicalAxisError (instead of leaving that array unsharded)."""
    check_rules_cover(axes_tree, self._rules(), "the partitioner's logical axis rules")
    return jax.tree.map(self.sharding, axes_tree, is_leaf=is_axes)

  def replicated(self) -> NamedSharding:
    return NamedSharding(self.mesh, PartitionSpec())

  def data_sharding(self, ndim: int = 2) -> NamedSharding:
    return NamedSharding(self.mesh, PartitionSpec(DATA, *([None] * (ndim - 1))))

  def shard_batch(self, host_batch) -> Any:
    """Host-local numpy batch (this process's rows) -> globally sharded jax arrays."""
    def one(x):
      x = np.asarray(x)
      sharding = self.data_sharding(x.ndim)
      global_shape = (x.shape[0] * jax.process_count(),) + x.shape[1:]
      return jax.make_array_from_process_local_data(sharding, x, global_shape)
    return jax.tree.map(one, host_batch)


def maybe_initialize_distributed(coordinator_address: Optional[str] = None,
                                 num_processes: Optional[int] = None,
                                 process_id: Optional[int] = None) -> bool:
  """Joins a multi-process run through `jax.distributed` when a coordinator is given (flags
  or JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID). Returns whether it did."""
  coordinator_address = coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS")
  if not coordinator_address:
    return False
  if num_processes is None and os.environ.get("JAX_NUM_PROCESSES"):
    num_processes = int(os.environ["JAX_NUM_PROCESSES"])
  if process_id is None and os.environ.get("JAX_PROCESS_ID"):
    process_id = int(os.environ["JAX_PROCESS_ID"])
  if num_processes is None or process_id is None:
    raise PartitioningError(
        f"coordinator address {coordinator_address!r} given without the number of processes "
        f"and this process's id (--num_processes/--process_id or JAX_NUM_PROCESSES/"
        f"JAX_PROCESS_ID)")
  if not 0 <= process_id < num_processes:
    raise PartitioningError(f"process_id={process_id} must be in [0, {num_processes})")
  jax.distributed.initialize(coordinator_address=coordinator_address,
                             num_processes=num_processes, process_id=process_id)
  logging.info("joined %d processes as process %d (coordinator %s)", num_processes,
               process_id, coordinator_address)
  return True
