"""The logical axis names of the network's parameters, activations and caches, and their rules.

T5X's names ('embed', 'mlp', 'heads', 'joined_kv', 'kv', 'vocab', 'relpos_buckets', 'layers' when
scanned, 'batch' and 'length' for activations) plus the two grouped-query attention adds for its K
key/value heads:
  'grouped_kv'  the K*H output dim of the decoder's key/value kernels (parameters),
  'kv_heads'   the K dim of the decoder's key/value activations (attention.py constrains them
               with `nn.with_logical_constraint`) and decoding caches; the encoder's
               keys/values, K = N always, use T5X's 'heads'.
They shard over 'model' only when K is a multiple of the model axis size: each device then
holds the key/value heads of exactly its own query heads (query head n uses key/value head
n // (N/K), see grouping.py), so attention needs no communication. Otherwise they are
replicated: every device holds all K heads and its query heads still meet their own.
`check_rules_cover` refuses a rules table that misses an axis (flax would silently leave that
array unsharded).
"""

from __future__ import annotations

from typing import List, Mapping, Optional, Sequence, Tuple

import jax
from jax.sharding import PartitionSpec

DATA = "data"
MODEL = "model"
LogicalRules = Sequence[Tuple[str, Optional[str]]]

# Every logical axis the parameters and decoding caches can carry.
PARAM_AXES = ("vocab", "embed", "mlp", "heads", "joined_kv", "grouped_kv", "relpos_buckets",
              "layers")
CACHE_AXES = ("batch", "kv_heads", "length", "kv", "layers")
# Per cache leaf (T5X's names), unscanned; a scanned model's caches add 'layers' in front.
# `cache_index` is a scalar, or [B] after a prompt prefill.
CACHE_LEAF_AXES = {"cached_key": ("batch", "kv_heads", "length", "kv"),
                   "cached_value": ("batch", "kv_heads", "length", "kv"),
                   "kv_filled": ("batch",), "cache_index": ("batch",)}

# T5X's standard rules for 1-D activation and parameter partitioning (t5x/partitioning.py's
# `standard_logical_axis_rules()` with its defaults): what a t5x user's partitioner holds.
T5X_STANDARD_RULES: Tuple[Tuple[str, Optional[str]], ...] = (
    ("batch", DATA),
    ("vocab", MODEL),
    ("embed", None),
    ("mlp", MODEL),
    ("heads", MODEL),
    ("kv", None),
    ("joined_kv", MODEL),
    ("relpos_buckets", None),
    ("abspos_buckets", None),
    ("length", None),
    ("layers", None),
    ("stack", None),
    ("mlp_activations", None),
)
# The logical axes grouped-query attention adds to T5X's.
KV_HEAD_AXES = ("grouped_kv", "kv_heads")


def kv_heads_shardable(num_kv_heads: int, model_axis_size: int) -> bool:
  """Whether K key/value heads can be split evenly over the model axis."""
  return num_kv_heads % model_axis_size == 0


def kv_heads_sharded(num_kv_heads: Optional[int] = None,
                     num_cross_kv_heads: Optional[int] = None, model_axis_size: int = 1) -> bool:
  """Whether the key/value heads shard over the model axis: only when every given K (None:
  multi-head, sharded like the query heads) is a multiple of `model_axis_size` (one logical
  name serves the self- and cross-attention K). Otherwise every device of the model axis holds
  all K heads of both. The one statement of the rule: the rules tables (`kv_head_rules`), the
  start-up messages and the performance model (`perf_model.kv_head_copies`) all ask it."""
  ks = [k for k in (num_kv_heads, num_cross_kv_heads) if k is not None]
  return all(kv_heads_shardable(k, model_axis_size) for k in ks)


def kv_head_rules(num_kv_heads: Optional[int] = None, num_cross_kv_heads: Optional[int] = None,
                  model_axis_size: int = 1) -> List[Tuple[str, Optional[str]]]:
  """Rules for 'grouped_kv' and 'kv_heads': 'model' when `kv_heads_sharded`, else replicated."""
  kv_axis = (MODEL if kv_heads_sharded(num_kv_heads, num_cross_kv_heads, model_axis_size)
             else None)
  return [(name, kv_axis) for name in KV_HEAD_AXES]


def standard_logical_axis_rules(num_kv_heads: Optional[int] = None,
                                num_cross_kv_heads: Optional[int] = None,
                                model_axis_size: int = 1) -> List[Tuple[str, Optional[str]]]:
  """T5X's standard rules (1-D activation partitioning) plus the key/value-head axes.

  `num_kv_heads` / `num_cross_kv_heads`: K of the decoder's self- and cross-attention (None:
  multi-head, sharded like query heads). Key/value heads shard over 'model' only when every
  such K is a multiple of `model_axis_size`.
  """
  rules = list(T5X_STANDARD_RULES)
  at = [name for name, _ in rules].index("joined_kv") + 1
  return rules[:at] + kv_head_rules(num_kv_heads, num_cross_kv_heads, model_axis_size) + rules[at:]


class LogicalAxisError(ValueError):
  """A logical axis of the parameters (or caches) that the axis rules do not cover."""


def logical_axis_names(axes_tree) -> dict:
  """{logical axis name: first parameter path using it} over a tree of axis-name tuples."""
  flat = jax.tree_util.tree_flatten_with_path(axes_tree, is_leaf=is_axes)[0]
  names = {}
  for path, axes in flat:
    for name in axes if is_axes(axes) else ():
      if name is not None and name not in names:
        names[name] = "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)
  return names


def check_rules_cover(axes_tree, rules, what: str = "the logical axis rules") -> None:
  """Raises LogicalAxisError naming every logical axis of `axes_tree` (a tree of axis-name
  tuples, e.g. `abstract_params_and_axes(model)[1]`) that `rules` does not name.

  `rules`: (name, mesh axis) pairs, or a mapping keyed by name (e.g. Adafactor factor rules).
  flax would map an unknown axis to no mesh axis at all, leaving that weight unsharded
  without a word; this check turns that into an error at start-up.
  """
  known = set(rules) if isinstance(rules, Mapping) else {name for name, _ in rules}
  missing = {n: p for n, p in logical_axis_names(axes_tree).items() if n not in known}
  if missing:
    used = "; ".join(f"{n!r} (e.g. {p})" for n, p in sorted(missing.items()))
    raise LogicalAxisError(
        f"{what} do not cover logical axis/axes {sorted(missing)}: used by {used}. Add a rule "
        f"for each (gqa_t5.t5x_compat.logical_axis_rules() and logical_factor_rules() return "
        f"t5x's tables with gqa_t5's axes added)")


def is_axes(x) -> bool:
  return isinstance(x, (tuple, PartitionSpec)) and all(
      isinstance(a, (str, type(None))) for a in x)
