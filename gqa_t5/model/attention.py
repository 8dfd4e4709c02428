"""Grouped-query attention (GQA): N query heads share K key/value heads in groups of G = N/K.

K = N is multi-head attention, K = 1 multi-query. Keys and values stay at K heads everywhere:
the query is reshaped to [.., K, G, H] and every einsum contracts against the K-head keys/values
directly, so nothing is repeated to N heads, in training or in decoding.

Einsum legend:
  B batch, T query length, S key length, D model dim,
  N query heads, K key/value heads, G = N/K group size, H head dim.

Decoding caches (T5X names, mutable `cache` collection):
  self-attention:  cached_key, cached_value [B, K, S, H]; cache_index (scalar step).
  cross-attention: cached_key, cached_value [B, K, S, H] of the projected encoder output, filled once
                   per sequence; kv_filled [B] says whether they hold it yet.
The [B, K, S, H] layout makes each step's two dots batched (B, K) matmuls over contiguous [S, H]
blocks.
"""

from __future__ import annotations

import math
from typing import Callable, Optional

import jax
import jax.numpy as jnp
from flax import linen as nn

from gqa_t5.model import grouping
from gqa_t5.model.layers import Dense, Dtype, default_kernel_init, project

# (position, key length S) -> the bias row [N, S] of that decode position.
PositionBiasFn = Callable[[jnp.ndarray], jnp.ndarray]


class GroupedAttention(nn.Module):
  """T5 attention (no 1/sqrt(H) scaling at run time) with K key/value heads.

  Attributes:
    emb_dim: D.
    num_heads: N query heads.
    num_kv_heads: K key/value heads (must divide N).
    head_dim: H.
    kv_kernel_axis: logical name of the key/value kernels' output dim. The decoder uses 'grouped_kv'
      so that the partitioner can replicate the K heads when K does not divide the model axis.
  """

  emb_dim: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  dtype: Dtype = jnp.float32
  dropout_rate: float = 0.0
  float32_logits: bool = False
  kv_kernel_axis: str = "joined_kv"

  def setup(self):
    self.group_size = grouping.group_size(self.num_heads, self.num_kv_heads)
    # T5 folds 1/sqrt(H) into the query initialiser instead of scaling logits.
    scale = math.sqrt(self.head_dim)
    query_init = lambda *args: default_kernel_init(*args) / scale
    joined_q = self.num_heads * self.head_dim
    joined_kv = self.num_kv_heads * self.head_dim
    self.query = Dense(self.emb_dim, joined_q, ("embed", "joined_kv"), self.dtype, query_init)
    self.key = Dense(self.emb_dim, joined_kv, ("embed", self.kv_kernel_axis), self.dtype)
    self.value = Dense(self.emb_dim, joined_kv, ("embed", self.kv_kernel_axis), self.dtype)
    self.out = Dense(joined_q, self.emb_dim, ("joined_kv", "embed"), self.dtype)

  # ---- projections ---------------------------------------------------------------------------

  def _queries(self, inputs_q: jnp.ndarray) -> jnp.ndarray:
    b, t, _ = inputs_q.shape
    q = self.query(inputs_q)                                           # [B, T, N*H]
    return q.reshape(b, t, self.num_kv_heads, self.group_size, self.head_dim)  # [B, T, K, G, H]

  def _keys_values(self, inputs_kv: jnp.ndarray):
    return (self._split_kv(self.key(inputs_kv)),                      # [B, S, K, H]
            self._split_kv(self.value(inputs_kv)))                    # [B, S, K, H]

  def _split_kv(self, x: jnp.ndarray) -> jnp.ndarray:
    b, s, _ = x.shape
    return x.reshape(b, s, self.num_kv_heads, self.head_dim)         # [B, S, K, H]

  def _output(self, context: jnp.ndarray) -> jnp.ndarray:
    b, t = context.shape[:2]
    return self.out(context.reshape(b, t, self.num_heads * self.head_dim))  # [B, T, D]

  def _softmax(self, logits: jnp.ndarray, deterministic: bool) -> jnp.ndarray:
    weights = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(self.dtype)
    if not deterministic and self.dropout_rate > 0.0:
      weights = nn.Dropout(self.dropout_rate, broadcast_dims=(-2,))(weights, deterministic=False)
    return weights

  def _logits_dtype(self):
    return jnp.float32 if self.float32_logits else self.dtype

  # ---- full-sequence attention (training, scoring, the encoder) --------------------------------

  def attend(self, q, k, v, mask, bias, deterministic):
    """q [B,T,K,G,H], k/v [B,S,K,H], mask [B,1,T,S] or None, bias [1|B,N,T,S] or None."""
    dt = self._logits_dtype()
    logits = jnp.einsum("btkgh,bskh->bkgts", q.astype(dt), k.astype(dt))  # [B, K, G, T, S]
    if bias is not None:
      logits = logits + _group_heads(bias, self.num_kv_heads).astype(dt)  # [1|B, K, G, T, S]
    if mask is not None:
      logits = jnp.where(mask[:, :, None] > 0, logits, jnp.finfo(dt).min)  # mask [B, 1, 1, T, S]
    weights = self._softmax(logits, deterministic)                      # [B, K, G, T, S]
    return jnp.einsum("bkgts,bskh->btkgh", weights, v.astype(self.dtype))  # [B, T, K, G, H]

  @nn.compact
  def __call__(self, inputs_q: jnp.ndarray, inputs_kv: jnp.ndarray,
               mask: Optional[jnp.ndarray] = None, bias: Optional[jnp.ndarray] = None, *,
               deterministic: bool = True, decode: bool = False,
               position_bias_fn: Optional[PositionBiasFn] = None,
               cross_attention: bool = False, cross_kv_cached: bool = False) -> jnp.ndarray:
    """Attention output [B, T, D].

    Args:
      inputs_q: [B, T, D] queries' input.
      inputs_kv: [B, S, D] keys' and values' input.
      mask: [B, 1, T, S], nonzero where attention is allowed (unused in a decode step of the
        self-attention, which masks by position).
      bias: [1|B, N, T, S] additive logits bias (relative positions); unused in a decode step.
      decode: cached incremental decoding (T5X's convention: the first call, with full-length
        inputs, only creates the cache; each later call processes one step).
      position_bias_fn: in a self-attention decode step, the bias row [N, S] of a position.
      cross_attention: the keys/values come from the encoder output, so in decoding they are
        projected once per sequence into the cache and reused.
      cross_kv_cached: the caller guarantees the cross-attention cache already holds the projected
        encoder keys/values (our decoding loops fill it before the loop), so a step reads them with
        no branch. Without it (t5x's loops) each step checks `kv_filled` and projects on the first.
    """
    if decode and self.has_variable("cache", "cached_key"):
      if cross_attention:
        return self._cross_attention_step(inputs_q, inputs_kv, mask, deterministic,
                                          cross_kv_cached)
      return self._self_attention_step(inputs_q, inputs_kv, position_bias_fn, deterministic)
    if decode:
      self._create_cache(inputs_q.shape[0], inputs_kv.shape[1], cross_attention)
    q = self._queries(inputs_q)
    k, v = self._keys_values(inputs_kv)
    return self._output(self.attend(q, k, v, mask, bias, deterministic))

  # ---- cached decoding -----------------------------------------------------------------------

  def _create_cache(self, batch: int, length: int, cross_attention: bool) -> None:
    shape = (batch, self.num_kv_heads, length, self.head_dim)            # [B, K, S, H]
    self.variable("cache", "cached_key", jnp.zeros, shape, self.dtype)
    self.variable("cache", "cached_value", jnp.zeros, shape, self.dtype)
    if cross_attention:
      self.variable("cache", "kv_filled", jnp.zeros, (batch,), jnp.bool_)
    else:
      self.variable("cache", "cache_index", lambda: jnp.array(0, dtype=jnp.int32))

  def _step_attend(self, q, cached_k, cached_v, valid, bias_row, deterministic):
    """One query step: q [B, K, G, H] against cached_k/v [B, K, S, H]."""
    dt = self._logits_dtype()
    logits = jnp.einsum("bkgh,bksh->bkgs", q.astype(dt), cached_k.astype(dt))  # [B, K, G, S]
    if bias_row is not None:
      logits = logits + bias_row.reshape(self.num_kv_heads, self.group_size, -1).astype(dt)
    logits = jnp.where(valid, logits, jnp.finfo(dt).min)                # valid [B|1, 1, 1, S]
    weights = self._softmax(logits, deterministic)                      # [B, K, G, S]
    return jnp.einsum("bkgs,bksh->bkgh", weights, cached_v)             # [B, K, G, H]

  def _self_attention_step(self, inputs_q, inputs_kv, position_bias_fn, deterministic):
    b, t, _ = inputs_q.shape
    if t != 1:
      raise ValueError(f"a cached decode step takes one token per sequence, got length {t}")
    cached_key = self.variable("cache", "cached_key", None)
    cached_value = self.variable("cache", "cached_value", None)
    cache_index = self.variable("cache", "cache_index", None)
    index = cache_index.value
    k, v = self._keys_values(inputs_kv)                                 # [B, 1, K, H]
    start = (0, 0, index, 0)
    keys = jax.lax.dynamic_update_slice(cached_key.value, k.swapaxes(1, 2).astype(self.dtype),
                                        start)                          # [B, K, S, H]
    values = jax.lax.dynamic_update_slice(cached_value.value, v.swapaxes(1, 2).astype(self.dtype),
                                          start)                        # [B, K, S, H]
    cached_key.value, cached_value.value = keys, values
    cache_index.value = index + 1
    length = keys.shape[2]
    valid = (jnp.arange(length) <= index)[None, None, None, :]          # [1, 1, 1, S]
    bias_row = None if position_bias_fn is None else position_bias_fn(index, keys.shape[2])
    q = self._queries(inputs_q)[:, 0]                                   # [B, K, G, H]
    context = self._step_attend(q, keys, values, valid, bias_row, deterministic)
    return self._output(context[:, None])                               # [B, 1, D]

  def _cross_attention_step(self, inputs_q, encoded, mask, deterministic, cross_kv_cached):
    cached_key = self.variable("cache", "cached_key", None)
    cached_value = self.variable("cache", "cached_value", None)
    kv_filled = self.variable("cache", "kv_filled", None)
    if cross_kv_cached:
      # Read-only: writing the cache back would make XLA copy it at every step.
      keys, values = cached_key.value, cached_value.value
    else:
      keys, values = self._fill_cross_cache(encoded, cached_key, cached_value, kv_filled)
    if mask is None:
      valid = jnp.ones((1, 1, 1, keys.shape[2]), bool)                  # [1, 1, 1, S]
    else:
      valid = mask[:, :, -1:, :] > 0                                    # [B, 1, 1, S]
    q = self._queries(inputs_q)[:, 0]                                   # [B, K, G, H]
    context = self._step_attend(q, keys, values, valid, None, deterministic)
    return self._output(context[:, None])                               # [B, 1, D]

  def _fill_cross_cache(self, encoded, cached_key, cached_value, kv_filled):
    key_kernel, value_kernel = self.key.kernel, self.value.kernel

    def project_encoded():
      # Runs once per sequence: the first step after the cache was created.
      k = project(encoded, key_kernel, self.dtype)                        # [B, S, K*H]
      v = project(encoded, value_kernel, self.dtype)                      # [B, S, K*H]
      return (self._split_kv(k).swapaxes(1, 2).astype(self.dtype),       # [B, K, S, H]
              self._split_kv(v).swapaxes(1, 2).astype(self.dtype))

    keys, values = jax.lax.cond(kv_filled.value[0],
                                lambda: (cached_key.value, cached_value.value), project_encoded)
    cached_key.value, cached_value.value = keys, values
    kv_filled.value = jnp.ones_like(kv_filled.value)
    return keys, values


def _group_heads(x: jnp.ndarray, num_kv_heads: int) -> jnp.ndarray:
  """[B, N, T, S] -> [B, K, G, T, S] (query head n = k*G + g)."""
  b, n, t, s = x.shape
  return x.reshape(b, num_kv_heads, n // num_kv_heads, t, s)
