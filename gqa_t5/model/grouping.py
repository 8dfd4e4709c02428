"""The one definition of which query heads share a key/value head, of the K that can group N
heads (`valid_kv_heads`) and of what a K is called (`kv_label`: MHA, MQA, GQA-K).

Query head n = k*G + g (G = N/K) uses key/value head k: adjacent query heads form a group.
A flat `[..., N*H]` projection therefore reshapes to `[..., K, G, H]` with no transpose, which is
what the attention einsums rely on and what the checkpoint converter pools over. The attention,
the config's validation and the converter (`convert/pooling.py`, `convert/converter.py`) split,
pool and validate heads through these functions, and the benchmarks, jobs and reports name K
through `kv_label`; they work on numpy and jax arrays alike (reshapes only).
"""

from __future__ import annotations

from typing import List, Optional


def valid_kv_heads(num_heads: int) -> List[int]:
  """Every K that can group `num_heads` query heads: the divisors of N, ascending."""
  return [k for k in range(1, num_heads + 1) if num_heads % k == 0]


def kv_label(num_kv_heads: Optional[int], num_heads: int) -> str:
  """The paper's name of K key/value heads for N query heads: 'MHA' (K = N; None means N),
  'MQA' (K = 1) or 'GQA-K'."""
  k = num_heads if num_kv_heads is None else num_kv_heads
  return "MHA" if k == num_heads else ("MQA" if k == 1 else f"GQA-{k}")


def kv_name(num_kv_heads: Optional[int], num_heads: int) -> str:
  """`kv_label` for file and stage names: 'mha', 'mqa' or 'gqaK'."""
  return kv_label(num_kv_heads, num_heads).lower().replace("-", "")


def group_size(num_heads: int, num_kv_heads: int, what: str = "num_kv_heads") -> int:
  """G = N / K; raises ValueError naming `what` when K does not divide N."""
  if num_kv_heads <= 0 or num_heads <= 0:
    raise ValueError(f"head counts must be positive, got num_heads={num_heads}, "
                     f"{what}={num_kv_heads}")
  if num_heads % num_kv_heads:
    raise ValueError(f"{what}={num_kv_heads} does not divide num_heads={num_heads}: each group "
                     f"of query heads shares one key/value head; use one of "
                     f"{valid_kv_heads(num_heads)}")
  return num_heads // num_kv_heads


def kv_head_of(query_head: int, num_heads: int, num_kv_heads: int) -> int:
  """The key/value head that query head `query_head` attends with."""
  return query_head // group_size(num_heads, num_kv_heads)


def query_heads_of(kv_head: int, num_heads: int, num_kv_heads: int) -> range:
  """The (adjacent) query heads that share key/value head `kv_head`."""
  g = group_size(num_heads, num_kv_heads)
  return range(kv_head * g, (kv_head + 1) * g)


def group_query_heads(x, num_kv_heads: int, axis: int = -2):
  """Splits the query-head axis `axis` (size N) of `x` into [K, G]: head n -> (n // G, n % G).

  E.g. queries [B, T, N, H] -> [B, T, K, G, H] (axis=-2), a bias [B, N, T, S] -> [B, K, G, T, S]
  (axis=1).
  """
  axis = axis % x.ndim
  g = group_size(x.shape[axis], num_kv_heads)
  return x.reshape(x.shape[:axis] + (num_kv_heads, g) + x.shape[axis + 1:])


def group_flat_heads(x, num_heads: int, num_kv_heads: int, what: str = "array"):
  """[..., N*H] -> [..., K, G, H]: a flat query-head projection (or kernel) in groups."""
  width = x.shape[-1]
  if width % num_heads:
    raise ValueError(f"{what}: width {width} is not a multiple of {num_heads} heads")
  heads = x.reshape(x.shape[:-1] + (num_heads, width // num_heads))   # [..., N, H]
  return group_query_heads(heads, num_kv_heads, axis=-2)                # [..., K, G, H]
