"""Grouped-query attention (GQA): N query heads share K key/value heads in groups of G = N/K.

K = N is multi-head attention, K = 1 multi-query. Keys and values stay at K heads everywhere:
the query is reshaped to [.., K, G, H] and `dot_product_attention`, the one attention core,
contracts it against the K-head keys/values directly, so nothing is repeated to N heads, in
training, in prefill or in decoding. A cached decode step is the same core with T = 1.

Einsum legend:
  B batch, T query length, S key length, D model dim,
  N query heads, K key/value heads, G = N/K group size, H head dim,
  R = G*T query rows that read one key/value head (the core's matrix products).

Decoding caches (T5X names, mutable `cache` collection):
  self-attention:  cached_key, cached_value [B, K, S, H]; cache_index: the next position, a
                   scalar, or [B] after a prompt prefill (per-example lengths, as T5X's).
  cross-attention: cached_key, cached_value [B, K, S, H] of the projected encoder output, filled
                   once per sequence; kv_filled [B] says whether they hold it yet.
The [B, K, S, H] layout makes each step's two dots batched (B, K) matmuls over contiguous [S, H]
blocks, with the G*T query rows of a key/value head as the matmuls' rows (`_query_rows`).

Activation shardings (T5X's 1-D activation partitioning, logical names of model/axes.py): the
flat query and context projections are ('batch', 'length', 'joined_kv'), so the N query heads
split over the model axis; the reshape to [B, T, K, G, H] has no constraint of its own (its
split follows the flat one's contiguous blocks: on K when K is a multiple of the model axis).
Keys, values and caches are ('batch', kv head axis, 'length', 'kv'), where the decoder's kv
head axis is 'kv_heads' (sharded only when K is a multiple of the model axis, replicated
otherwise) and the encoder's is 'heads'. Outside a partitioner's rules these constraints do
nothing.
"""

from __future__ import annotations

import math
from typing import Optional

import jax
import jax.numpy as jnp
from flax import linen as nn

from gqa_t5.model import grouping, products
from gqa_t5.model.layers import Dense, Dtype, RelativeBias, project, scaled_kernel_init


def dot_product_attention(query: jnp.ndarray, key: jnp.ndarray, value: jnp.ndarray, *,
                          mask: Optional[jnp.ndarray] = None, bias: Optional[jnp.ndarray] = None,
                          dtype: Dtype = jnp.float32, float32_logits: bool = False,
                          dropout_rate: float = 0.0,
                          dropout_rng: Optional[jnp.ndarray] = None) -> jnp.ndarray:
  """The grouped-attention core: logits, bias, mask, softmax, weighted sum of K-head values.

  Args:
    query: [B, T, K, G, H] (T5 scales no logits: 1/sqrt(H) lives in the query initialiser).
    key, value: [B, K, S, H].
    mask: [B|1, 1, T, S], nonzero where a query may attend to a key (None: everywhere).
    bias: [B|1, N, T, S] additive logits bias, query head n = k*G + g.
    dtype: dtype of the softmax weights and the weighted sum.
    float32_logits: compute the logits in float32 whatever `dtype` is.
    dropout_rate, dropout_rng: dropout on the weights, shared across query positions (T5X's
      broadcast_dims=(-2,)); no dropout when `dropout_rng` is None.

  Returns:
    context [B, T, K, G, H].
  """
  logits_dtype = jnp.float32 if float32_logits else dtype
  batch, length, num_kv_heads, group, head_dim = query.shape
  key_length = key.shape[2]
  rows = _query_rows(query)                                                 # [B, K, R, H]
  logits = products.logits(rows.astype(logits_dtype), key.astype(logits_dtype))  # [B, K, R, S]
  logits = logits.reshape(batch, num_kv_heads, group, length, key_length)  # [B, K, G, T, S]
  if bias is not None:
    grouped_bias = grouping.group_query_heads(bias, num_kv_heads, axis=1)   # [B|1, K, G, T, S]
    logits = logits + grouped_bias.astype(logits_dtype)                     # [B, K, G, T, S]
  weights = products.masked_softmax(logits, mask).astype(dtype)            # [B, K, G, T, S]
  if dropout_rng is not None and dropout_rate > 0.0:
    keep_shape = weights.shape[:-2] + (1,) + weights.shape[-1:]             # [B, K, G, 1, S]
    keep = jax.random.bernoulli(dropout_rng, 1.0 - dropout_rate, keep_shape)
    weights = jnp.where(keep, weights / (1.0 - dropout_rate), 0.0).astype(dtype)
  weights = weights.reshape(batch, num_kv_heads, group * length, key_length)  # [B, K, R, S]
  context = products.context(weights, value.astype(dtype))                 # [B, K, R, H]
  context = context.reshape(batch, num_kv_heads, group, length, head_dim)   # [B, K, G, T, H]
  return context.transpose(0, 3, 1, 2, 4)                                   # [B, T, K, G, H]


def _query_rows(query: jnp.ndarray) -> jnp.ndarray:
  """[B, T, K, G, H] -> [B, K, R, H]: the R = G*T query rows that read key/value head k.

  Both products of the core are then one (B, K)-batched matrix product with a single row dim
  against the [S, H] block of head k: [R, H] x [S, H]^T and [R, S] x [S, H] (`products.py`).
  It is the canonical batched matmul of every backend, and the layout the CPU decode kernels
  take; of the einsum forms it is also the one XLA:CPU ran fastest (with the grouped letters
  'btkgh,bksh->bkgts' it picked a transposed [S, G] product; scripts/attention_core_bench.py).
  Only the small query and context are transposed; keys/values are read in place.
  """
  batch, length, num_kv_heads, group, head_dim = query.shape
  rows = query.transpose(0, 2, 3, 1, 4)                                     # [B, K, G, T, H]
  return rows.reshape(batch, num_kv_heads, group * length, head_dim)      # [B, K, R, H]


def _write_positions(cache: jnp.ndarray, update: jnp.ndarray, index: jnp.ndarray) -> jnp.ndarray:
  """cache [B, K, S, H] with update [B, K, T, H] written from position `index` ([] or [B])."""
  if index.ndim == 0:
    return jax.lax.dynamic_update_slice(cache, update, (0, 0, index, 0))
  write = lambda c, u, i: jax.lax.dynamic_update_slice(c, u, (0, i, 0))
  return jax.vmap(write)(cache, update, index)


class GroupedAttention(nn.Module):
  """T5 attention with K key/value heads; T5X's parameter and cache names.

  Attributes:
    emb_dim: D.
    num_heads: N query heads.
    num_kv_heads: K key/value heads (must divide N).
    head_dim: H.
    kv_kernel_axis: logical name of the key/value kernels' output dim. The decoder uses 'grouped_kv'
      so that the partitioner can replicate the K heads when K does not divide the model axis.
    cross_attention: the keys/values come from the encoder output; in decoding they are
      projected once per sequence into the cache and reused by every step.
  """

  emb_dim: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  dtype: Dtype = jnp.float32
  dropout_rate: float = 0.0
  float32_logits: bool = False
  kv_kernel_axis: str = "joined_kv"
  cross_attention: bool = False

  @property
  def kv_heads_axis(self) -> str:
    # The decoder's K heads follow the 'kv_heads' rule (replicated when K does not split over
    # the model axis); the encoder's are its N query heads.
    return "kv_heads" if self.kv_kernel_axis == "grouped_kv" else "heads"

  def _constrain_kv(self, x: jnp.ndarray) -> jnp.ndarray:
    return nn.with_logical_constraint(x, ("batch", self.kv_heads_axis, "length", "kv"))

  def setup(self):
    grouping.group_size(self.num_heads, self.num_kv_heads)
    # T5 folds 1/sqrt(H) into the query initialiser instead of scaling logits.
    query_init = scaled_kernel_init(math.sqrt(self.head_dim))
    joined_q = self.num_heads * self.head_dim
    joined_kv = self.num_kv_heads * self.head_dim
    kv_axes = ("embed", self.kv_kernel_axis)
    self.query = Dense(self.emb_dim, joined_q, ("embed", "joined_kv"), self.dtype, query_init)
    self.key = Dense(self.emb_dim, joined_kv, kv_axes, self.dtype)
    self.value = Dense(self.emb_dim, joined_kv, kv_axes, self.dtype)
    self.out = Dense(joined_q, self.emb_dim, ("joined_kv", "embed"), self.dtype)

  # ---- projections ---------------------------------------------------------------------------

  def _queries(self, inputs_q: jnp.ndarray) -> jnp.ndarray:
    q = self.query(inputs_q)                                            # [B, T, N*H]
    q = nn.with_logical_constraint(q, ("batch", "length", "joined_kv"))
    return grouping.group_flat_heads(q, self.num_heads, self.num_kv_heads)  # [B, T, K, G, H]

  def _split_kv(self, x: jnp.ndarray) -> jnp.ndarray:
    b, s, _ = x.shape
    x = x.reshape(b, s, self.num_kv_heads, self.head_dim)              # [B, S, K, H]
    return self._constrain_kv(x.swapaxes(1, 2).astype(self.dtype))      # [B, K, S, H]

  def _keys_values(self, inputs_kv: jnp.ndarray):
    return self._split_kv(self.key(inputs_kv)), self._split_kv(self.value(inputs_kv))

  def _attend(self, inputs_q, keys, values, mask, bias, deterministic) -> jnp.ndarray:
    """Projects the queries, runs the core and the output projection: [B, T, D]."""
    use_dropout = not deterministic and self.dropout_rate > 0.0
    context = dot_product_attention(
        self._queries(inputs_q), keys, values, mask=mask, bias=bias, dtype=self.dtype,
        float32_logits=self.float32_logits, dropout_rate=self.dropout_rate,
        dropout_rng=self.make_rng("dropout") if use_dropout else None)  # [B, T, K, G, H]
    b, t = context.shape[:2]
    context = context.reshape(b, t, self.num_heads * self.head_dim)     # [B, T, N*H]
    context = nn.with_logical_constraint(context, ("batch", "length", "joined_kv"))
    return self.out(context)                                            # [B, T, D]

  # ---- the call ------------------------------------------------------------------------------

  @nn.compact
  def __call__(self, inputs_q: jnp.ndarray, inputs_kv: jnp.ndarray,
               mask: Optional[jnp.ndarray] = None, bias: Optional[jnp.ndarray] = None, *,
               deterministic: bool = True, decode: bool = False, prefill: bool = False,
               prefill_lengths: Optional[jnp.ndarray] = None,
               position_bias: Optional[RelativeBias] = None,
               cross_kv_cached: bool = False) -> jnp.ndarray:
    """Attention output [B, T, D].

    Args:
      inputs_q: [B, T, D] queries' input.
      inputs_kv: [B, S, D] keys' and values' input.
      mask: [B, 1, T, S], nonzero where attention is allowed (a self-attention decode step
        masks by position instead).
      bias: [1|B, N, T, S] additive logits bias (relative positions); unused in a decode step.
      decode: cached incremental decoding (T5X's convention: the first call, with full-length
        inputs, only creates the cache; each later call processes one step).
      prefill: T5X's prompt prefill: attend over the whole (prompt) input as in training and
        store the self-attention keys/values of the first `prefill_lengths` [B] positions
        (the cross-attention stores the projected encoder output); the next decode step then
        continues at position `prefill_lengths` of each example.
      position_bias: in a self-attention decode step, the relative bias whose rows at the
        step's own position are added (the full [T, S] bias is never built).
      cross_kv_cached: the caller guarantees the cross-attention cache already holds the projected
        encoder keys/values (our decoding loops fill it before the loop), so a step reads them with
        no branch. Without it (t5x's loops) each step checks `kv_filled` and projects on the first.
    """
    if decode and prefill:
      raise ValueError("GroupedAttention: decode and prefill cannot both be True (prefill the "
                       "prompt first, then decode step by step)")
    initialised = self.has_variable("cache", "cached_key")
    if (decode or prefill) and not initialised:
      self._create_cache(inputs_q.shape[0], inputs_kv.shape[1])
    if decode and initialised:
      if self.cross_attention:
        return self._cross_attention_step(inputs_q, inputs_kv, mask, deterministic,
                                          cross_kv_cached)
      return self._self_attention_step(inputs_q, inputs_kv, position_bias, deterministic)
    keys, values = self._keys_values(inputs_kv)                         # [B, K, S, H] each
    if prefill:
      self._store_prefill(keys, values, prefill_lengths)
    return self._attend(inputs_q, keys, values, mask, bias, deterministic)

  # ---- cached decoding -----------------------------------------------------------------------

  def _create_cache(self, batch: int, length: int) -> None:
    shape = (batch, self.num_kv_heads, length, self.head_dim)            # [B, K, S, H]
    self.variable("cache", "cached_key", jnp.zeros, shape, self.dtype)
    self.variable("cache", "cached_value", jnp.zeros, shape, self.dtype)
    if self.cross_attention:
      self.variable("cache", "kv_filled", jnp.zeros, (batch,), jnp.bool_)
    else:
      self.variable("cache", "cache_index", lambda: jnp.array(0, dtype=jnp.int32))

  def _store_prefill(self, keys, values, prefill_lengths) -> None:
    cached_key = self.variable("cache", "cached_key", None)
    cached_value = self.variable("cache", "cached_value", None)
    if self.cross_attention:
      cached_key.value, cached_value.value = keys, values               # [B, K, S, H]
      kv_filled = self.variable("cache", "kv_filled", None)
      kv_filled.value = jnp.ones_like(kv_filled.value)
      return
    batch, _, length, _ = cached_key.value.shape
    prompt = keys.shape[2]
    if prompt > length:
      raise ValueError(f"prefill: the prompt has {prompt} positions but the cache holds {length}")
    if prefill_lengths is None:
      raise ValueError("prefill of a self-attention cache needs prefill_lengths [B]")
    lengths = jnp.broadcast_to(jnp.asarray(prefill_lengths, jnp.int32), (batch,))  # [B]
    # Positions at or past an example's prompt length stay empty, as step-by-step decoding
    # would leave them.
    kept = (jnp.arange(prompt) < lengths[:, None])[:, None, :, None]    # [B, 1, T, 1]
    start = jnp.zeros((), jnp.int32)
    cached_key.value = _write_positions(cached_key.value, jnp.where(kept, keys, 0), start)
    cached_value.value = _write_positions(cached_value.value, jnp.where(kept, values, 0), start)
    self.variable("cache", "cache_index", None).value = lengths

  def _self_attention_step(self, inputs_q, inputs_kv, position_bias, deterministic):
    t = inputs_q.shape[1]
    if t != 1:
      raise ValueError(f"a cached decode step takes one token per sequence, got length {t}")
    cached_key = self.variable("cache", "cached_key", None)
    cached_value = self.variable("cache", "cached_value", None)
    cache_index = self.variable("cache", "cache_index", None)
    # [] or [B]; t5x's beam search hands a prefilled index on as [B, W] (flaxformer flattens it).
    index = cache_index.value if cache_index.value.ndim == 0 else cache_index.value.reshape(-1)
    k, v = self._keys_values(inputs_kv)                                 # [B, K, 1, H] each
    keys = self._constrain_kv(_write_positions(cached_key.value, k, index))    # [B, K, S, H]
    values = self._constrain_kv(_write_positions(cached_value.value, v, index))  # [B, K, S, H]
    cached_key.value, cached_value.value = keys, values
    cache_index.value = cache_index.value + 1
    length = keys.shape[2]
    positions = jnp.reshape(index, (-1, 1))                             # [B|1, T=1]
    key_positions = jnp.arange(length)                                  # [S]
    mask = (key_positions <= positions[:, :, None])[:, None]            # [B|1, 1, 1, S]
    bias = None if position_bias is None else position_bias(positions, key_positions)
    return self._attend(inputs_q, keys, values, mask, bias, deterministic)  # [B, 1, D]

  def _cross_attention_step(self, inputs_q, encoded, mask, deterministic, cross_kv_cached):
    cached_key = self.variable("cache", "cached_key", None)
    cached_value = self.variable("cache", "cached_value", None)
    kv_filled = self.variable("cache", "kv_filled", None)
    if cross_kv_cached:
      # Read-only: writing the cache back would make XLA copy it at every step.
      keys, values = cached_key.value, cached_value.value
    else:
      keys, values = self._fill_cross_cache(encoded, cached_key, cached_value, kv_filled)
    step_mask = None if mask is None else mask[:, :, -1:, :]            # [B, 1, 1, S]
    return self._attend(inputs_q, keys, values, step_mask, None, deterministic)  # [B, 1, D]

  def _fill_cross_cache(self, encoded, cached_key, cached_value, kv_filled):
    key_kernel, value_kernel = self.key.kernel, self.value.kernel

    def project_encoded():
      # Runs once per sequence: the first step after the cache was created.
      return (self._split_kv(project(encoded, key_kernel, self.dtype)),     # [B, K, S, H]
              self._split_kv(project(encoded, value_kernel, self.dtype)))   # [B, K, S, H]

    keys, values = jax.lax.cond(kv_filled.value[0],
                                lambda: (cached_key.value, cached_value.value), project_encoded)
    cached_key.value, cached_value.value = keys, values
    kv_filled.value = jnp.ones_like(kv_filled.value)
    return keys, values
