"""The network's matrix products and the attention softmax between two of them, and the one
place their formulation is chosen by backend.

  logits:  rows [B, K, R, H] . keys [B, K, S, H]      -> [B, K, R, S]   (contract H)
  softmax: logits [B, K, R, S]                         -> [B, K, R, S]   (over S, float32)
           (`masked_softmax`: logits [B, K, G, T, S] and the attention mask, select then softmax)
  context: weights [B, K, R, S] . values [B, K, S, H] -> [B, K, R, H]   (contract S)
  dense:   x [..., D] . kernel [D, F]                  -> [..., F]       (every projection)

R = G*T query rows read key/value head k (`attention._query_rows`). Keys and values stay at K
heads: no formulation repeats them to N.

Every backend runs them as einsums (the attention's two as one (B, K)-batched matrix product),
with one exception chosen here by the platform the program is lowered for
(`lax.platform_dependent`: a TPU or GPU program, or a TPU program compiled on a CPU host, never
contains it): on XLA:CPU, in float32 on one device, a decode step's products are the custom calls
of `cpu_kernels.cc`:
  - logits and context with R <= MAX_KERNEL_ROWS query rows per key/value head and H a multiple
    of 8. XLA runs them as batched matrix products with 1-8 rows at a quarter to a half of the
    memory bandwidth, and worst at 2-8 rows, so a GQA step was slower than MHA's although it
    reads fewer bytes (issue 23; scripts/attention_core_bench.py compares the einsum forms). The
    kernels stream each head's keys and values with the rows' accumulators in registers, for
    every K alike, so the step time follows the bytes.
  - dense with at most MAX_KERNEL_ROWS rows (x's leading dims): XLA's general matrix product
    packs the whole weight for a few rows; the kernel streams it once.
  - softmax over at most MAX_KERNEL_ROWS rows per key/value head (a decode step's; always
    float32, whatever the model's dtype): XLA's max, exp, sum and divide over the logits took
    0.5 ms of a step at 2,048 keys (the same for every K), the kernel one pass over each row in
    L1. With float32 logits the attention mask's select is done in the same passes
    (`masked_softmax`).
Longer products (the encoder, prefill, training at length) are real matrix products that XLA's
GEMMs run well, and stay einsums.

Under differentiation a product is the einsum forward and backward (`_forward_only`), so the
kernels never change what training computes, even at sequence lengths short enough for them: a
run trains the same on every CPU, whichever instruction set its kernels were built for. Outside
it (decoding, evaluation) they match the einsums to float32 rounding (tests/test_cpu_kernels.py).
GQA_T5_CPU_KERNELS=0 runs the einsums everywhere (`cpu_kernels.py`).

One more choice by platform is a gradient's: the relative position bias is a lookup in a small
table ([N, buckets]: `bias_lookup`), and differentiating a lookup makes a scatter-add of every
(query, key) pair's gradient into the table's few cells. A GPU adds those with atomics that
thousands of updates contend for (in bfloat16 always a compare-and-swap loop, in float32 too in
jaxlib 0.10.2-0.11.0: openxla/xla#26371, #46225, jax-ml/jax#38806), and a TPU serialises a
scatter. There the table's gradient is a one-hot matrix product (as T5X computes the bias),
[N, T*S] . [T*S, buckets]; XLA:CPU adds the updates in a loop and keeps the scatter (so CPU
training computes what it always did). The forward pass is the same lookup everywhere.
"""

from __future__ import annotations

import math
from typing import Optional

import jax
import jax.numpy as jnp

from gqa_t5.model import cpu_kernels

MAX_KERNEL_ROWS = 64


def logits(rows: jnp.ndarray, keys: jnp.ndarray) -> jnp.ndarray:
  """rows [B, K, R, H], keys [B, K, S, H] -> [B, K, R, S]."""
  if rows.shape[-1] % 8 == 0 and _use_kernel(rows.shape[-2], rows, keys):
    return jax.lax.platform_dependent(rows, keys, cpu=_kernel_logits, default=_einsum_logits)
  return _einsum_logits(rows, keys)


def context(weights: jnp.ndarray, values: jnp.ndarray) -> jnp.ndarray:
  """weights [B, K, R, S], values [B, K, S, H] -> [B, K, R, H]."""
  if values.shape[-1] % 8 == 0 and _use_kernel(weights.shape[-2], weights, values):
    return jax.lax.platform_dependent(weights, values, cpu=_kernel_context,
                                      default=_einsum_context)
  return _einsum_context(weights, values)


def softmax(logits: jnp.ndarray) -> jnp.ndarray:
  """logits [B, K, R, S] float32 -> softmax over S (`jax.nn.softmax`'s, to float32 rounding)."""
  if _use_kernel(logits.shape[-2], logits, logits):
    return jax.lax.platform_dependent(logits, cpu=_kernel_softmax, default=_jax_softmax)
  return _jax_softmax(logits)


def masked_softmax(logits: jnp.ndarray, mask: Optional[jnp.ndarray]) -> jnp.ndarray:
  """logits [B, K, G, T, S], mask [B|1, 1, T, S] (nonzero: the key may be attended) or None ->
  float32 softmax over S with masked keys at `finfo(logits.dtype).min` (weight 0; a row with
  every key masked is uniform), [B, K, G, T, S].

  On a CPU decode step in float32 the mask is applied inside the softmax kernel (the same
  select, then the same softmax: bit for bit the unfused result); XLA's separate select over
  the logits cost 85 us per cross-attention layer at 2,048 keys, for every K alike.
  """
  batch, _, group, length, key_length = logits.shape
  kernel_mask = (mask is not None and mask.ndim == 4 and mask.shape[0] in (1, batch)
                 and mask.shape[1:] == (1, length, key_length))    # the kernel's [B|1, 1, T, S]
  if kernel_mask and logits.dtype == jnp.float32 and _use_kernel(group * length, logits, logits):
    return jax.lax.platform_dependent(logits, mask.astype(jnp.float32),
                                      cpu=_kernel_masked_softmax, default=_select_then_softmax)
  return _select_then_softmax(logits, mask)


def _select_then_softmax(logits, mask, rows_softmax=softmax):
  """The select, then `rows_softmax` over the [B, K, R, S] rows: XLA's select and the softmax
  kernel on a CPU decode step in another dtype, everywhere else what the TPU and GPU run."""
  batch, num_kv_heads, group, length, key_length = logits.shape
  if mask is not None:
    allowed = mask[:, :, None] > 0                                      # [B|1, 1, 1, T, S]
    logits = jnp.where(allowed, logits, jnp.finfo(logits.dtype).min)   # [B, K, G, T, S]
  rows = logits.astype(jnp.float32).reshape(
      batch, num_kv_heads, group * length, key_length)                  # [B, K, R, S]
  return rows_softmax(rows).reshape(logits.shape)                       # [B, K, G, T, S]


def dense(x: jnp.ndarray, kernel: jnp.ndarray) -> jnp.ndarray:
  """x [..., D] @ kernel [D, F] -> [..., F] (both already in the computation dtype)."""
  rows = math.prod(x.shape[:-1])
  if _use_kernel(rows, x, kernel):
    return jax.lax.platform_dependent(x, kernel, cpu=_kernel_dense, default=jnp.dot)
  return jnp.dot(x, kernel)


def bias_lookup(table: jnp.ndarray, buckets: jnp.ndarray) -> jnp.ndarray:
  """table [N, buckets], bucket ids [1|B, T, S] -> [N, 1|B, T, S] (`jnp.take` along the table's
  bucket axis); the table's gradient as the platform's best formulation (module docstring)."""
  return _bias_lookup(table, buckets)


def _take_buckets(table, buckets):
  return jnp.take(table, buckets, axis=1)                              # [N, 1|B, T, S]


def _scatter_table_grad(grad, buckets, table):
  """The lookup's own transpose: a scatter-add of grad [N, 1|B, T, S] into [N, buckets]."""
  return jax.vjp(lambda t: _take_buckets(t, buckets), table)[1](grad)[0]


def _one_hot_table_grad(grad, buckets, table):
  """The same sum as one matrix product over every (batch, query, key) position, in float32 at
  full precision (a TPU's default would round the gradient to bfloat16; the product is small):
  grad [N, 1|B, T, S] . one_hot(buckets) [1|B, T, S, buckets] -> [N, buckets]."""
  one_hot = jax.nn.one_hot(buckets, table.shape[1], dtype=grad.dtype)  # [1|B, T, S, buckets]
  summed = jnp.einsum("nbts,btsk->nk", grad, one_hot, precision=jax.lax.Precision.HIGHEST,
                      preferred_element_type=jnp.float32)               # [N, buckets]
  return summed.astype(table.dtype)


@jax.custom_vjp
def _bias_lookup(table, buckets):
  return _take_buckets(table, buckets)


def _bias_lookup_fwd(table, buckets):
  return _take_buckets(table, buckets), (buckets, table)


def _bias_lookup_bwd(saved, grad):
  buckets, table = saved
  table_grad = jax.lax.platform_dependent(grad, buckets, table, cpu=_scatter_table_grad,
                                          default=_one_hot_table_grad)
  return table_grad, None


_bias_lookup.defvjp(_bias_lookup_fwd, _bias_lookup_bwd)


def _einsum_logits(rows, keys):
  return jnp.einsum("bkrh,bksh->bkrs", rows, keys)                     # [B, K, R, S]


def _einsum_context(weights, values):
  return jnp.einsum("bkrs,bksh->bkrh", weights, values)                # [B, K, R, H]


def _jax_softmax(logits):
  return jax.nn.softmax(logits, axis=-1)                               # [B, K, R, S]


def _use_kernel(rows: int, a: jnp.ndarray, b: jnp.ndarray) -> bool:
  if not 1 <= rows <= MAX_KERNEL_ROWS or a.dtype != jnp.float32 or b.dtype != jnp.float32:
    return False
  # A custom call has no sharding rule: keep it out of programs partitioned over devices.
  if jax.device_count() != 1 or jax.devices()[0].platform != "cpu":
    return False
  return cpu_kernels.load() is not None


def _ffi(name: str, a: jnp.ndarray, b: jnp.ndarray, out_shape) -> jnp.ndarray:
  call = jax.ffi.ffi_call(cpu_kernels.TARGETS[name], jax.ShapeDtypeStruct(out_shape, jnp.float32),
                          vmap_method="broadcast_all")
  return call(a, b)


def _ffi_logits(rows, keys):
  return _ffi("logits", rows, keys, rows.shape[:-1] + keys.shape[-2:-1])   # [B, K, R, S]


def _ffi_context(weights, values):
  return _ffi("context", weights, values, weights.shape[:-1] + values.shape[-1:])  # [B, K, R, H]


def _ffi_softmax(logits):
  call = jax.ffi.ffi_call(cpu_kernels.TARGETS["softmax"],
                          jax.ShapeDtypeStruct(logits.shape, jnp.float32),
                          vmap_method="broadcast_all")
  return call(logits)                                                   # [B, K, R, S]


def _ffi_masked_softmax(logits, mask):
  call = jax.ffi.ffi_call(cpu_kernels.TARGETS["masked_softmax"],
                          jax.ShapeDtypeStruct(logits.shape, jnp.float32),
                          vmap_method="sequential")
  return call(logits, mask)                                             # [B, K, G, T, S]


def _ffi_dense(x, kernel):
  flat = x.reshape(-1, x.shape[-1])                                     # [M, D]
  y = jax.ffi.ffi_call(cpu_kernels.TARGETS["dense"],
                       jax.ShapeDtypeStruct((flat.shape[0], kernel.shape[1]), jnp.float32),
                       vmap_method="sequential")(flat, kernel)          # [M, F]
  return y.reshape(x.shape[:-1] + kernel.shape[1:])                     # [..., F]


def _forward_only(kernel, reference):
  """`kernel` where nothing differentiates the call; under differentiation `reference` (the
  einsum, or jax's softmax), forward (the primal a gradient step uses) and backward (its
  vector-Jacobian product)."""
  wrapped = jax.custom_vjp(kernel)
  wrapped.defvjp(lambda *args: (reference(*args), args),
                 lambda saved, grad: jax.vjp(reference, *saved)[1](grad))
  return wrapped


_kernel_logits = _forward_only(_ffi_logits, _einsum_logits)
_kernel_context = _forward_only(_ffi_context, _einsum_context)
_kernel_dense = _forward_only(_ffi_dense, jnp.dot)
_kernel_softmax = _forward_only(_ffi_softmax, _jax_softmax)
_kernel_masked_softmax = _forward_only(
    _ffi_masked_softmax, lambda logits, mask: _select_then_softmax(logits, mask, _jax_softmax))
