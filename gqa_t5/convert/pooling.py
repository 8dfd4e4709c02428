"""Turning the key/value heads of a multi-head attention layer into K grouped heads (numpy only).

Which heads form a group is `gqa_t5.model.grouping`'s to say (`query_heads_of`); a key kernel
[D, N*H] is gathered into [D, K, G, H] by it, and pooling reduces the G axis.

Methods (Ainslie et al. 2023, Sec. 2.1 and Fig. 4):
  mean:    average the G heads of each group (the paper's method).
  first:   keep the first head of each group.
  random:  initialise the K heads from scratch (T5X's fan-in normal), ignoring the checkpoint.
  aligned: first rotate every head by an orthogonal matrix that leaves the network's function
           unchanged, chosen so that the heads of a group agree (generalised orthogonal
           Procrustes), then mean-pool. See `align_attention`.
"""

from __future__ import annotations

import hashlib
from typing import Optional, Tuple

import numpy as np

from gqa_t5.model import grouping

METHODS = ("mean", "first", "random", "aligned")


def _check_heads(width: int, num_heads: int, num_kv_heads: int, what: str) -> Tuple[int, int]:
  """(head_dim H, group size G) of a [D, N*H] kernel; ValueError naming `what` otherwise."""
  try:
    group = grouping.group_size(num_heads, num_kv_heads)
  except ValueError as error:
    raise ValueError(f"{what}: {error}") from None
  if width % num_heads:
    raise ValueError(f"{what}: width {width} is not a multiple of {num_heads} heads")
  return width // num_heads, group


def group_members(num_heads: int, num_kv_heads: int) -> np.ndarray:
  """[K, G] query head indices: row k holds the heads that share key/value head k."""
  return np.array([list(grouping.query_heads_of(k, num_heads, num_kv_heads))
                   for k in range(num_kv_heads)], dtype=np.int64)


def grouped(kernel: np.ndarray, num_heads: int, num_kv_heads: int, what: str = "kernel"
            ) -> np.ndarray:
  """[D, N*H] -> [D, K, G, H]: the heads of each group, as `grouping` assigns them."""
  head_dim, _ = _check_heads(kernel.shape[1], num_heads, num_kv_heads, what)
  heads = kernel.reshape(kernel.shape[0], num_heads, head_dim)
  return heads[:, group_members(num_heads, num_kv_heads)]


def mean_pool(kernel: np.ndarray, num_heads: int, num_kv_heads: int, what: str = "kernel"
              ) -> np.ndarray:
  """The mean of each group's heads: [D, N*H] -> [D, K*H] (accumulated in float32)."""
  heads = grouped(kernel, num_heads, num_kv_heads, what)
  pooled = heads.astype(np.float32, copy=False).mean(axis=2)  # `grouped` already copied
  return pooled.reshape(kernel.shape[0], -1).astype(kernel.dtype)


def first_pool(kernel: np.ndarray, num_heads: int, num_kv_heads: int, what: str = "kernel"
               ) -> np.ndarray:
  """The first head of each group: [D, N*H] -> [D, K*H]."""
  heads = grouped(kernel, num_heads, num_kv_heads, what)
  return np.ascontiguousarray(heads[:, :, 0, :]).reshape(kernel.shape[0], -1)


def tensor_seed(seed: int, name: str) -> int:
  """A per-tensor seed: the same tensor gets the same draw whatever the conversion order."""
  digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
  return int.from_bytes(digest[:8], "little")


def random_init(shape: Tuple[int, int], dtype, seed: int, name: str) -> np.ndarray:
  """Fresh key/value kernel: normal with variance 1/fan_in (T5X's attention kernel init)."""
  rng = np.random.default_rng(tensor_seed(seed, name))
  fan_in = shape[0]
  values = rng.standard_normal(shape, dtype=np.float32) / np.sqrt(fan_in)
  return values.astype(dtype)


def pool(kernel: np.ndarray, num_heads: int, num_kv_heads: int, method: str,
         seed: int = 0, name: str = "kernel") -> np.ndarray:
  """Key or value kernel [D, N*H] -> [D, K*H] by 'mean', 'first' or 'random'."""
  if method == "mean":
    return mean_pool(kernel, num_heads, num_kv_heads, name)
  if method == "first":
    return first_pool(kernel, num_heads, num_kv_heads, name)
  if method == "random":
    head_dim, _ = _check_heads(kernel.shape[1], num_heads, num_kv_heads, name)
    return random_init((kernel.shape[0], num_kv_heads * head_dim), kernel.dtype, seed, name)
  raise ValueError(f"unknown pooling method {method!r}; known: {METHODS}")


# ----------------------------------------------------------------------------- aligned

def procrustes(source: np.ndarray, target: np.ndarray, gram: Optional[np.ndarray] = None
               ) -> np.ndarray:
  """The orthogonal R [H, H] minimising ||X (source R - target)||_F, X^T X = gram (I if None).

  With M = source^T gram target = U S V^T, the minimiser is R = U V^T.
  """
  cross = source.T @ target if gram is None else source.T @ gram @ target
  u, _, vt = np.linalg.svd(cross)
  return u @ vt


def group_rotations(heads: np.ndarray, gram: Optional[np.ndarray] = None,
                    iterations: int = 8, tolerance: float = 1e-7) -> np.ndarray:
  """Rotations [G, H, H] that bring heads [G, D, H] of one group into agreement.

  Generalised Procrustes: align every head to a reference (at first the first head, then the
  mean of the rotated heads) and repeat until the reference settles; no step can increase the
  spread around the mean.
  """
  heads = heads.astype(np.float64)
  weighted = heads if gram is None else np.einsum("de,geh->gdh", gram, heads)
  reference = heads[0]
  rotations = None
  for _ in range(max(1, iterations)):
    cross = np.einsum("gdh,dk->ghk", weighted, reference)  # heads^T gram reference
    u, _, vt = np.linalg.svd(cross)  # one batched call for the whole group
    rotations = u @ vt
    new_reference = np.einsum("gdh,ghk->dk", heads, rotations) / heads.shape[0]
    change = np.linalg.norm(new_reference - reference) / max(np.linalg.norm(reference), 1e-30)
    reference = new_reference
    if change < tolerance:
      break
  return rotations


def head_rotations(kernel: np.ndarray, num_heads: int, num_kv_heads: int,
                   gram: Optional[np.ndarray] = None, iterations: int = 8) -> np.ndarray:
  """Per query head rotations [N, H, H] aligning the heads of each group of `kernel` [D, N*H]."""
  heads = grouped(kernel, num_heads, num_kv_heads)  # [D, K, G, H]
  head_dim = heads.shape[-1]
  rotations = np.empty((num_heads, head_dim, head_dim))
  for k, members in enumerate(group_members(num_heads, num_kv_heads)):
    rotations[members] = group_rotations(np.moveaxis(heads[:, k], 1, 0), gram, iterations)
  return rotations


def rotate_columns(kernel: np.ndarray, rotations: np.ndarray) -> np.ndarray:
  """[D, N*H] with head n's columns multiplied by rotations[n] [H, H]."""
  num_heads, head_dim = rotations.shape[0], rotations.shape[1]
  heads = kernel.astype(np.float64).reshape(kernel.shape[0], num_heads, head_dim)
  rotated = np.einsum("dnh,nhk->dnk", heads, rotations)
  return rotated.reshape(kernel.shape).astype(kernel.dtype)


def rotate_rows(kernel: np.ndarray, rotations: np.ndarray) -> np.ndarray:
  """[N*H, D] with head n's rows multiplied on the left by rotations[n]^T."""
  num_heads, head_dim = rotations.shape[0], rotations.shape[1]
  heads = kernel.astype(np.float64).reshape(num_heads, head_dim, kernel.shape[1])
  rotated = np.einsum("nhk,nhd->nkd", rotations, heads)  # R^T @ rows
  return rotated.reshape(kernel.shape).astype(kernel.dtype)


def rotate_attention(query, key, value, out, qk_rotations, vo_rotations):
  """The same attention function with every head rotated (requires K = N: one key per query).

  Head n's scores use (x Q_n)(y K_n)^T = (x Q_n R)(y K_n R)^T for orthogonal R, and its output
  (a y V_n) O_n = (a y V_n P)(P^T O_n); T5 has no rotary embedding, so this is exact.
  """
  return (rotate_columns(query, qk_rotations), rotate_columns(key, qk_rotations),
          rotate_columns(value, vo_rotations), rotate_rows(out, vo_rotations))


def align_attention(query: np.ndarray, key: np.ndarray, value: np.ndarray, out: np.ndarray,
                    num_heads: int, num_kv_heads: int, key_gram: Optional[np.ndarray] = None,
                    value_gram: Optional[np.ndarray] = None, iterations: int = 8):
  """The 'aligned' conversion of one multi-head attention layer.

  Args:
    query, key, value: kernels [D, N*H] (key/value of the multi-head source: N heads).
    out: kernel [N*H, D].
    key_gram / value_gram: X^T X of calibration inputs to the key / value projection ([D, D]);
      None aligns the weights themselves.

  Returns:
    (query', key [D, K*H], value [D, K*H], out'): query and out rotated, key and value
    rotated then mean-pooled over each group.
  """
  if key.shape[1] != query.shape[1] or value.shape[1] != query.shape[1]:
    raise ValueError("aligned conversion needs a multi-head source (as many key/value heads "
                     f"as query heads): query {query.shape}, key {key.shape}, "
                     f"value {value.shape}")
  qk = head_rotations(key, num_heads, num_kv_heads, key_gram, iterations)
  vo = head_rotations(value, num_heads, num_kv_heads, value_gram, iterations)
  query, key, value, out = rotate_attention(query, key, value, out, qk, vo)
  return (query, mean_pool(key, num_heads, num_kv_heads), mean_pool(value, num_heads, num_kv_heads),
          out)


def pooling_error(kernel: np.ndarray, pooled: np.ndarray, num_heads: int, num_kv_heads: int
                  ) -> float:
  """Relative distance between each head and the K-head kernel replacing it (diagnostic)."""
  heads = grouped(kernel.astype(np.float64), num_heads, num_kv_heads)
  shared = pooled.astype(np.float64).reshape(pooled.shape[0], num_kv_heads, 1, -1)
  return float(np.linalg.norm(heads - shared) / np.linalg.norm(heads))
