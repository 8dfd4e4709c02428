"""Random parameters from a handful of compiled programs, equal bit for bit to one jitted `init`.

One jitted `module.init` makes XLA compile each parameter's key derivation and draw apart, so
its compile time grows with the number of parameters, not their size: T5.1.1-Large's took 46 s
on a 2-core CPU (the encoder 1.1 s) and had not finished after 100 s on an H200 (the decode loop
14 s). Here instead:
  1. one trace of `module.init` (nothing compiled) with `layers.recording_parameters` lists
     every parameter: its path, initialiser, shape, dtype and the key flax gives it;
  2. those keys are computed eagerly: the trace's equations that the keys need, one primitive at
     a time (flax derives each from the root key by one `fold_in`; each kind compiles once);
  3. the parameters that share initialiser, shape, dtype and sharding are drawn by one compiled
     program, called once per parameter with its key.
Each draw computes what the one program computes for that parameter, so the parameters are
those of `jax.jit(init)`, bit for bit (tests/test_param_init.py). (One vmapped draw per group
gives the same values too, but took 3.1-3.7 s against 2.2 s for 96 draws of [1024, 2816] on a
2-core CPU, and holds a stacked copy.)
Scanned stacks (`scan_layers`) draw their keys inside `nn.scan`, out of the outer trace's
reach; they keep the one jitted initialiser, which compiles a single layer anyway.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Dict, List, Sequence, Tuple

import jax
import jax.numpy as jnp
from flax import traverse_util
from jax.extend.core import Var, jaxpr_as_fun

from gqa_t5.model import layers

# `get_initial_variables` initialises on [1, 1] tokens whatever it is told; it needs the names.
INIT_SHAPES = {"encoder_input_tokens": (1, 1), "decoder_input_tokens": (1, 1)}

Path = Tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class _Parameter:
  path: Path
  init_fn: Callable[..., jnp.ndarray]
  shape: Tuple[int, ...]
  dtype: Any


def init_params(model, rng, shardings=None, dtype=None) -> Any:
  """`model`'s random parameters (`get_initial_variables(rng, ...)['params']`), created on the
  devices: nothing runs at full input size and nothing is placed twice. `shardings`: a tree of
  shardings as `Partitioner.shardings` gives (None: default placement). `dtype`: cast each
  parameter to it as it is drawn (None: as initialised, float32)."""
  if getattr(getattr(model, "module", None), "config", None) is None or (
      model.module.config.scan_layers):
    return _init_in_one_program(model, rng, shardings, dtype)
  parameters, keys = _parameters_and_keys(model, rng)
  flat_shardings = traverse_util.flatten_dict(shardings) if shardings is not None else {}
  flat: Dict[Path, jnp.ndarray] = {}
  for (init_fn, shape, init_dtype, sharding), members in _groups(
      parameters, keys, flat_shardings).items():
    draw = jax.jit(lambda key, f=init_fn, s=shape, d=init_dtype: _cast(f(key, s, d), dtype),
                   out_shardings=sharding)
    flat.update((path, draw(key)) for path, key in members)
  return traverse_util.unflatten_dict(flat)


def _groups(parameters: Sequence[_Parameter], keys: Sequence[jnp.ndarray],
            flat_shardings: Dict[Path, Any]) -> Dict[Tuple[Any, ...], List[Tuple[Path, Any]]]:
  """(initialiser, shape, dtype, sharding) -> its parameters' (path, key), in creation order."""
  groups: Dict[Tuple[Any, ...], List[Tuple[Path, Any]]] = {}
  for parameter, key in zip(parameters, keys):
    group = (parameter.init_fn, parameter.shape, parameter.dtype,
             flat_shardings.get(parameter.path))
    groups.setdefault(group, []).append((parameter.path, key))
  return groups


def _init_in_one_program(model, rng, shardings, dtype):
  def init(rng):
    params = model.get_initial_variables(rng, INIT_SHAPES)["params"]
    return jax.tree.map(lambda x: _cast(x, dtype), params)
  return jax.jit(init, out_shardings=shardings)(rng)


def _cast(x: jnp.ndarray, dtype) -> jnp.ndarray:
  return x if dtype is None else x.astype(dtype)


def _parameters_and_keys(model, rng) -> Tuple[List[_Parameter], Sequence[jnp.ndarray]]:
  """Every parameter in creation order, and the key flax draws it from."""
  parameters: List[_Parameter] = []
  traced_keys: List[jnp.ndarray] = []

  def record(path, init_fn, key, shape, dtype):
    parameters.append(_Parameter(path, init_fn, tuple(int(d) for d in shape), jnp.dtype(dtype)))
    traced_keys.append(key)
    return jnp.zeros(shape, dtype)  # only traced: the forward pass on [1, 1] needs a value

  def keys_of(rng):
    parameters.clear()
    traced_keys.clear()
    with layers.recording_parameters(record):
      model.get_initial_variables(rng, INIT_SHAPES)
    return list(traced_keys)

  closed = jax.make_jaxpr(keys_of)(rng)
  return parameters, _evaluate_outputs(closed, rng)


def _evaluate_outputs(closed, *args) -> List[Any]:
  """`closed`'s outputs, evaluating eagerly only the equations they depend on."""
  needed = {v for v in closed.jaxpr.outvars if isinstance(v, Var)}
  kept = []
  for eqn in reversed(closed.jaxpr.eqns):
    if any(v in needed for v in eqn.outvars):
      kept.append(eqn)
      needed.update(v for v in eqn.invars if isinstance(v, Var))
  pruned = closed.replace(jaxpr=closed.jaxpr.replace(eqns=kept[::-1]))
  return jaxpr_as_fun(pruned)(*args)
