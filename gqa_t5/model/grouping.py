"""The one definition of which query heads share a key/value head.

Query head n = k*G + g (G = N/K) uses key/value head k: adjacent query heads form a group.
A flat `[..., N*H]` projection therefore reshapes to `[..., K, G, H]` with no transpose, which is
what the attention einsums rely on and what the checkpoint converter pools over.
"""

from __future__ import annotations


def _groups_evenly(num_heads: int, num_kv_heads: int) -> bool:
  return num_heads % num_kv_heads == 0


def group_size(num_heads: int, num_kv_heads: int) -> int:
  """G = N / K; raises ValueError when K does not divide N."""
  if num_kv_heads <= 0 or num_heads <= 0:
    raise ValueError(f"head counts must be positive, got num_heads={num_heads}, "
                     f"num_kv_heads={num_kv_heads}")
  if not _groups_evenly(num_heads, num_kv_heads):
    raise ValueError(f"num_kv_heads={num_kv_heads} does not divide num_heads={num_heads}")
  return num_heads // num_kv_heads


def kv_head_choices(num_heads: int) -> list:
  """Every valid key/value head count K for N query heads (the divisors of N)."""
  return [k for k in range(1, num_heads + 1) if _groups_evenly(num_heads, k)]


def kv_head_of(query_head: int, num_heads: int, num_kv_heads: int) -> int:
  """The key/value head that query head `query_head` attends with."""
  return query_head // group_size(num_heads, num_kv_heads)


def query_heads_of(kv_head: int, num_heads: int, num_kv_heads: int) -> range:
  """The (adjacent) query heads that share key/value head `kv_head`."""
  g = group_size(num_heads, num_kv_heads)
  return range(kv_head * g, (kv_head + 1) * g)
