"""This device's memory bandwidth, measured: the denominator of the decode benchmark's roofline
(the bytes a step must read are `gqa_t5.perf_model.decode_step_bytes`)."""

from __future__ import annotations

import time
from typing import Optional

import jax
import jax.numpy as jnp


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
