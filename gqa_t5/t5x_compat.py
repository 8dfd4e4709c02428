"""Handing our network to t5x, where t5x is installed (it is not on PyPI; never a hard import).

`Transformer` already has t5x's `EncoderDecoder` interface (`encode`, `decode(..., decode=True,
max_decode_length=..., prefill=..., prefill_lengths=...)`, `__call__`, `scan_layers`, a mutable
`cache` collection whose only non-batch-leading leaves are named `cache_index`, as t5x's
`decoding.cache_map` expects), so t5x's own `EncoderDecoderModel` can wrap it directly. What t5x
does not know are our two logical axes, 'grouped_kv' (the decoder's key/value kernels) and
'kv_heads' (key/value activations and caches): this module returns t5x's rule tables with them
added, and checks a rules table before it silently leaves a weight unsharded.

Whether the K key/value heads shard over the model axis depends on that axis's size, which
is the mesh t5x actually builds, not the `num_partitions` a user meant (t5x's CPU mesh ignores
it; `model_parallel_submesh` overrides it). `logical_axis_rules` therefore reads the mesh the
gin-configured `PjitPartitioner` builds (`t5x_mesh`, with t5x's own `default_mesh`), logs the
key/value layout once, and refuses a NUM_PARTITIONS that disagrees with it.

  gin/t5x/gqa_t5_network.gin  binds all of this for a t5x user (see gin/t5x/README.md);
  t5x_model(config, vocabulary, optimizer_def)  builds the model in Python.
"""

from __future__ import annotations

import dataclasses
import importlib
import logging
from typing import Any, Dict, List, Optional, Tuple

import gin
import jax
from flax.core import freeze

from gqa_t5 import optim, partitioning
from gqa_t5.model import axes
from gqa_t5.model.config import T5Config
from gqa_t5.model.network import Transformer
from gqa_t5.models import EncoderDecoderModel

PARAM_AXES, CACHE_AXES = axes.PARAM_AXES, axes.CACHE_AXES

INSTALL_HINT = (
    "t5x is not on PyPI. Keep gqa_t5's pins: pip install -e '.[data,t5x]' (t5x's PyPI imports), "
    "then pip install --no-deps 'git+https://github.com/google-research/t5x' "
    "'git+https://github.com/google/airio' 'git+https://github.com/google-research/jestimator' "
    "(gin/t5x/README.md has the recipe); gqa_t5's own trainer needs no t5x.")


def require_t5x():
  """The t5x package's `models` module, or an ImportError that says how to get it."""
  try:
    return importlib.import_module("t5x.models")
  except ModuleNotFoundError as error:
    raise ImportError(f"t5x is not installed: {INSTALL_HINT}") from error


def _t5x_module(name: str):
  try:
    return importlib.import_module(name)
  except ImportError:
    return None


# ---- rules ---------------------------------------------------------------------------------


class MeshMismatchError(ValueError):
  """NUM_PARTITIONS (what the rules were told) differs from the mesh t5x builds."""


# PjitPartitioner arguments that decide its mesh (t5x's `default_mesh` takes them in order).
_MESH_ARGS = ("num_partitions", "model_parallel_submesh", "backend", "ici_mesh_shape",
              "dcn_mesh_shape")
_LOGGED: set = set()


def _resolve(value):
  """A gin binding's value with macros (%NAME) resolved; other references stay unresolved."""
  while isinstance(value, gin.config.ConfigurableReference):
    name, configurable = value.config_key
    if configurable != "gin.macro":
      return value
    value = gin.query_parameter(f"%{name}")
  return value


def partitioner_mesh_args() -> Optional[Dict[str, Any]]:
  """The mesh arguments gin binds for t5x's PjitPartitioner (None: t5x or its bindings are
  not there). Read without evaluating the bindings' references (the rules are one of them)."""
  t5x_partitioning = _t5x_module("t5x.partitioning")
  if t5x_partitioning is None or not hasattr(t5x_partitioning, "PjitPartitioner"):
    return None
  try:
    bindings = gin.get_bindings(t5x_partitioning.PjitPartitioner, resolve_references=False)
  except (ValueError, KeyError):  # not a registered configurable: the user builds it in Python
    return None
  args = {name: _resolve(bindings.get(name)) for name in _MESH_ARGS}
  if any(isinstance(v, gin.config.ConfigurableReference) for v in args.values()):
    return None
  return args


def t5x_mesh():
  """The mesh t5x's gin-configured PjitPartitioner builds (t5x's `default_mesh` on the same
  arguments), or None when that cannot be known (no t5x, no gin bindings)."""
  args = partitioner_mesh_args()
  t5x_partitioning = _t5x_module("t5x.partitioning")
  if args is None or not hasattr(t5x_partitioning, "default_mesh"):
    return None
  if not args["num_partitions"] and not args["model_parallel_submesh"]:
    return None  # t5x's PjitPartitioner refuses this configuration itself
  return t5x_partitioning.default_mesh(*(args[name] for name in _MESH_ARGS))


def model_axis_size(mesh) -> int:
  """The size of a mesh's 'model' axis (1 when it has none); `mesh.shape` maps axis names to
  sizes, as jax's Mesh has it."""
  return int(dict(mesh.shape).get(axes.MODEL, 1))


def kv_layout(num_kv_heads: Optional[int], num_cross_kv_heads: Optional[int],
              model_size: int) -> str:
  """One line saying how the key/value heads lie on a model axis of `model_size` devices."""
  rules = dict(axes.kv_head_rules(num_kv_heads, num_cross_kv_heads, model_size))
  ks = {"self-attention": num_kv_heads, "cross-attention": num_cross_kv_heads}
  if num_cross_kv_heads is None:  # the cross-attention has the self-attention's K
    given = ("multi-head, K = num_heads" if num_kv_heads is None else
             f"K={num_kv_heads} in self- and cross-attention")
  else:
    given = ", ".join(f"{what} K={'num_heads' if k is None else k}" for what, k in ks.items())
  if rules["grouped_kv"] == axes.MODEL:
    return (f"key/value heads ({given}) sharded over t5x's model axis of size {model_size}: "
            f"each device holds the key/value heads of its own query heads")
  bad = [k for k in ks.values() if k is not None and not axes.kv_heads_shardable(k, model_size)]
  return (f"key/value heads ({given}) replicated on each of the {model_size} devices of t5x's "
          f"model axis: K={bad[0]} is not a multiple of {model_size}")


def check_num_partitions(num_partitions: Optional[int], mesh) -> int:
  """The model-axis size of `mesh`; MeshMismatchError when a given `num_partitions` differs."""
  size = model_axis_size(mesh)
  if num_partitions is not None and num_partitions != size:
    raise MeshMismatchError(
        f"NUM_PARTITIONS = {num_partitions}, but the mesh t5x builds has a model axis of size "
        f"{size} (mesh {dict(mesh.shape)}; t5x builds it from PjitPartitioner's num_partitions "
        f"/ model_parallel_submesh, and on CPU from all devices whatever num_partitions says). "
        f"The key/value rules would be decided for the wrong axis: set NUM_PARTITIONS = {size} "
        f"or leave it None (read from the mesh), or change the partitioner's configuration")
  return size


def logical_axis_rules(num_kv_heads: Optional[int] = None,
                       num_cross_kv_heads: Optional[int] = None,
                       num_partitions: Optional[int] = None,
                       base_rules=None, mesh=None) -> List[Tuple[str, Optional[str]]]:
  """t5x-ready partitioning rules: `base_rules` (default: t5x's standard table, from t5x when
  installed) plus 'grouped_kv' and 'kv_heads', which shard over 'model' when every K is a
  multiple of the model axis's size and are replicated otherwise.

  The model axis is `mesh`'s (default: `t5x_mesh()`, the one t5x's gin-configured partitioner
  builds); `num_partitions`, when given, must agree with it (MeshMismatchError otherwise).
  Without a mesh (no t5x or no gin bindings), `num_partitions` (default 1) is taken as its
  size. The key/value layout is logged once. Raises LogicalAxisError when the result still
  misses an axis our network uses.
  """
  if base_rules is None:
    t5x_partitioning = _t5x_module("t5x.partitioning")
    base_rules = (t5x_partitioning.standard_logical_axis_rules() if t5x_partitioning
                  else axes.T5X_STANDARD_RULES)
  mesh = t5x_mesh() if mesh is None else mesh
  if mesh is None:
    size, source = num_partitions or 1, "NUM_PARTITIONS (no t5x mesh to read)"
  else:
    size, source = check_num_partitions(num_partitions, mesh), f"t5x's mesh {dict(mesh.shape)}"
  message = f"gqa_t5: {kv_layout(num_kv_heads, num_cross_kv_heads, size)} (from {source})"
  if message not in _LOGGED:
    _LOGGED.add(message)
    logging.info("%s", message)
  rules = [tuple(rule) for rule in base_rules]
  known = {name for name, _ in rules}
  rules += [rule for rule in axes.kv_head_rules(num_kv_heads, num_cross_kv_heads, size)
            if rule[0] not in known]
  check_rules(rules, "the logical axis rules")
  return rules


def logical_factor_rules(base_rules=None):
  """t5x-ready Adafactor factor rules (`adafactor.Adafactor.logical_factor_rules`): `base_rules`
  (default: t5x's `standard_logical_factor_rules()` when installed, else ours, which agree)
  plus gqa_t5's axes, factored as `gqa_t5.optim` factors them ('grouped_kv' a column, as
  'joined_kv'). Values are t5x's FactorDim when t5x is installed, else their names."""
  adafactor = _t5x_module("t5x.adafactor")
  if base_rules is None:
    base_rules = (adafactor.standard_logical_factor_rules() if adafactor
                  else optim.STANDARD_FACTOR_RULES)
  rules: Dict[str, Any] = dict(base_rules)
  for name in PARAM_AXES + CACHE_AXES:
    if name not in rules and name in optim.STANDARD_FACTOR_RULES:
      rules[name] = optim.STANDARD_FACTOR_RULES[name]
  if adafactor:
    rules = {k: adafactor.factor_name_to_factordim(v) for k, v in rules.items()}
  check_rules(rules, "the Adafactor factor rules", PARAM_AXES)
  return freeze(rules)


def check_rules(rules, what: str = "the logical axis rules",
                axes_names=PARAM_AXES + CACHE_AXES) -> None:
  """Raises LogicalAxisError naming each of our logical axes (`axes_names`) that `rules`
  ((name, mesh axis) pairs or a mapping) does not cover. Use it on a t5x rules table before
  training with it."""
  axes.check_rules_cover({name: (name,) for name in axes_names}, rules, what)


def check_model_rules(config: T5Config, rules, what: str = "the logical axis rules") -> None:
  """Like `check_rules`, on the axes that `Transformer(config)`'s parameters actually carry."""
  _, params_axes = partitioning.abstract_params_and_axes(EncoderDecoderModel(Transformer(config)))
  axes.check_rules_cover(params_axes, rules, what)


def cache_logical_axes(cache, scanned: bool = False) -> Any:
  """Logical axes of a decoding cache tree (a scanned model's caches get 'layers' first)."""
  layers = ("layers",) if scanned else ()

  def axes_of(path, leaf):
    name = path[-1].key
    leaf_axes = axes.CACHE_LEAF_AXES[name]
    if name == "cache_index":  # a scalar per layer, or [B] after a prompt prefill
      leaf_axes = leaf_axes[:leaf.ndim - len(layers)]
    if leaf.ndim != len(layers + leaf_axes):
      raise ValueError(f"cache leaf {name} has shape {leaf.shape}; expected axes "
                       f"{layers + leaf_axes}")
    return layers + leaf_axes
  return jax.tree_util.tree_map_with_path(axes_of, cache)


# ---- the network from t5x's configuration --------------------------------------------------


def config_from_t5x(t5x_config, num_kv_heads: Optional[int] = None,
                    num_cross_kv_heads: Optional[int] = None, scan_layers: bool = False,
                    remat_policy: str = "none") -> T5Config:
  """Our T5Config from t5x's `network.T5Config` (as t5x's size gin files bind it: sizes,
  dtype, dropout_rate = %DROPOUT_RATE, ...) plus the key/value head counts."""
  ours = {f.name for f in dataclasses.fields(T5Config)}
  fields = {f.name: getattr(t5x_config, f.name) for f in dataclasses.fields(t5x_config)}
  unknown = sorted(set(fields) - ours)
  if unknown:
    raise ValueError(f"t5x's T5Config has field(s) {unknown} that gqa_t5's T5Config lacks; "
                     f"gqa_t5 knows {sorted(ours)}")
  return T5Config(**fields, num_kv_heads=num_kv_heads, num_cross_kv_heads=num_cross_kv_heads,
                  scan_layers=scan_layers, remat_policy=remat_policy)


def transformer(t5x_config, num_kv_heads: Optional[int] = None,
                num_cross_kv_heads: Optional[int] = None, scan_layers: bool = False,
                remat_policy: str = "none"):
  """Our `Transformer` configured from t5x's `network.T5Config` (what the gin file binds)."""
  return Transformer(config_from_t5x(t5x_config, num_kv_heads, num_cross_kv_heads,
                                     scan_layers, remat_policy))


def t5x_model(config: T5Config, vocabulary, optimizer_def, **model_kwargs):
  """t5x's `EncoderDecoderModel` around our `Transformer(config)`."""
  t5x_models = require_t5x()
  return t5x_models.EncoderDecoderModel(
      module=Transformer(config), input_vocabulary=vocabulary, output_vocabulary=vocabulary,
      optimizer_def=optimizer_def, **model_kwargs)
