"""The memory roofline of a decode step: bytes it must read, measured bandwidth, batch that fits.

A greedy decode step of the encoder-decoder reads every decoder weight once (the cross-attention
key/value kernels excepted: they are applied once per sequence, before the loop), the whole
self-attention cache [B, K, T, H] (it is read at full length, masked past the current step) and
the cross-attention keys/values [B, K, S, H] of every layer. The byte counts come from the
config alone; a test checks them against the parameter and cache trees.
"""

from __future__ import annotations

import time
from typing import Dict, Optional

import jax
import jax.numpy as jnp

from gqa_t5.model.config import T5Config


def decoder_step_weights(config: T5Config) -> int:
  """Number of decoder weights one decode step reads."""
  d, n, h, f = config.emb_dim, config.num_heads, config.head_dim, config.mlp_dim
  k_self = config.self_attention_kv_heads
  self_attention = d * n * h * 2 + d * k_self * h * 2          # query, out; key, value
  cross_attention = d * n * h * 2                               # query, out (K/V: prefill)
  mlp = d * f * len(config.mlp_activations) + f * d
  norms = 3 * d
  per_layer = self_attention + cross_attention + mlp + norms
  relpos = n * config.relative_attention_num_buckets
  logits = d * config.vocab_size  # logits_dense, or the embedding when tied
  return config.num_decoder_layers * per_layer + relpos + d + logits


def decode_step_bytes(config: T5Config, batch: int, input_length: int, output_length: int,
                      weight_itemsize: Optional[int] = None) -> Dict[str, int]:
  """{'weights', 'self_cache', 'cross_kv', 'total'}: bytes one decode step reads.

  Caches are held at the activation dtype; weights at `weight_itemsize` bytes (default: the
  activation dtype's, as the decode benchmark stores them).
  """
  itemsize = jnp.dtype(config.dtype).itemsize
  weight_itemsize = itemsize if weight_itemsize is None else weight_itemsize
  layers, h = config.num_decoder_layers, config.head_dim
  self_cache = 2 * layers * batch * config.self_attention_kv_heads * output_length * h
  cross_kv = 2 * layers * batch * config.cross_attention_kv_heads * input_length * h
  out = {"weights": decoder_step_weights(config) * weight_itemsize,
         "self_cache": self_cache * itemsize, "cross_kv": cross_kv * itemsize}
  out["total"] = sum(out.values())
  return out


def cache_bytes_per_sequence(config: T5Config, input_length: int, output_length: int) -> int:
  """Bytes of one sequence's decoding caches (self + cross), at the activation dtype."""
  per_step = decode_step_bytes(config, 1, input_length, output_length, weight_itemsize=0)
  return per_step["self_cache"] + per_step["cross_kv"]


def fit_batch(per_sequence_bytes: int, fixed_bytes: int, memory_bytes: int,
              usable_fraction: float = 0.8, multiple: int = 8) -> int:
  """The largest batch (a multiple of `multiple`, at least 1) whose per-sequence bytes fit in
  `usable_fraction` of the memory left after `fixed_bytes`."""
  free = usable_fraction * (memory_bytes - fixed_bytes)
  batch = int(free // per_sequence_bytes)
  if batch >= multiple:
    batch -= batch % multiple
  if batch < 1:
    raise ValueError(f"no batch fits: {fixed_bytes / 2**30:.1f} GiB of parameters and buffers "
                     f"leave {free / 2**30:.1f} GiB usable of {memory_bytes / 2**30:.1f} GiB; "
                     f"one sequence needs {per_sequence_bytes / 2**30:.2f} GiB")
  return batch


def measure_bandwidth(num_bytes: int, repeats: int = 5) -> float:
  """Bytes/s of a read-dominated jitted sum over a float32 array of `num_bytes` (best of
  `repeats`; the array is freed afterwards)."""
  x = jnp.ones((max(num_bytes // 4, 1),), jnp.float32)
  total = jax.jit(jnp.sum)
  total(x).block_until_ready()
  best = float("inf")
  for _ in range(repeats):
    start = time.perf_counter()
    total(x).block_until_ready()
    best = min(best, time.perf_counter() - start)
  size = x.size * 4
  x.delete()
  return size / best


def probe_bytes(memory_bytes_limit: Optional[int], smoke: bool) -> int:
  """A probe far larger than any cache level, small beside the device's memory."""
  if smoke:
    return 32 * 2 ** 20
  if memory_bytes_limit:
    return int(min(4 * 2 ** 30, memory_bytes_limit // 20))
  return 2 ** 30
