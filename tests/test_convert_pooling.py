"""Pooling methods on known arrays: mean/first against loops, random seeds, aligned rotations."""

import ml_dtypes
import numpy as np
import pytest

from gqa_t5.convert import pooling

D, N, H = 5, 4, 3


def _kernel(seed=0):
  return np.random.default_rng(seed).standard_normal((D, N * H)).astype(np.float32)


def test_mean_matches_a_loop_reference():
  kernel = np.arange(D * N * H, dtype=np.float32).reshape(D, N * H)
  for k in (1, 2, 4):
    g = N // k
    reference = np.zeros((D, k * H), np.float32)
    for kv in range(k):
      for h in range(H):
        reference[:, kv * H + h] = np.mean([kernel[:, (kv * g + j) * H + h] for j in range(g)],
                                           axis=0)
    assert np.array_equal(pooling.mean_pool(kernel, N, k), reference), k
  # Known numbers: rows of 0..11 with N=4, H=3, K=2 pool columns {0,3},{1,4},{2,5},{6,9},...
  assert pooling.mean_pool(kernel, N, 2)[0].tolist() == [1.5, 2.5, 3.5, 7.5, 8.5, 9.5]
  assert pooling.mean_pool(kernel, N, 1)[0].tolist() == [4.5, 5.5, 6.5]


def test_first_keeps_the_first_head_of_each_group():
  kernel = _kernel()
  pooled = pooling.first_pool(kernel, N, 2)
  assert np.array_equal(pooled[:, :H], kernel[:, :H])          # head 0
  assert np.array_equal(pooled[:, H:], kernel[:, 2 * H:3 * H])  # head 2
  assert np.array_equal(pooling.first_pool(kernel, N, N), kernel)


def test_random_shapes_dtypes_and_seeds():
  kernel = _kernel()
  a = pooling.pool(kernel, N, 2, "random", seed=0, name="x/key/kernel")
  assert a.shape == (D, 2 * H) and a.dtype == np.float32
  assert np.array_equal(a, pooling.pool(kernel, N, 2, "random", seed=0, name="x/key/kernel"))
  assert not np.array_equal(a, pooling.pool(kernel, N, 2, "random", seed=1, name="x/key/kernel"))
  assert not np.array_equal(a, pooling.pool(kernel, N, 2, "random", seed=0, name="y/key/kernel"))
  big = pooling.random_init((400, 300), np.float32, seed=0, name="z")
  assert abs(big.std() - 400 ** -0.5) < 0.002 and abs(big.mean()) < 0.002  # fan-in normal
  bf16 = pooling.pool(kernel.astype(ml_dtypes.bfloat16), N, 1, "random", name="w")
  assert bf16.dtype.name == "bfloat16" and bf16.shape == (D, H)


def test_bad_head_counts():
  with pytest.raises(ValueError, match="num_kv_heads=3 does not divide"):
    pooling.mean_pool(_kernel(), N, 3)
  with pytest.raises(ValueError, match="unknown pooling method"):
    pooling.pool(_kernel(), N, 2, "median")


def _random_rotation(rng, size):
  q, r = np.linalg.qr(rng.standard_normal((size, size)))
  return q * np.sign(np.diag(r))


def test_procrustes_recovers_a_rotation():
  rng = np.random.default_rng(0)
  a = rng.standard_normal((20, H))
  rotation = _random_rotation(rng, H)
  found = pooling.procrustes(a @ rotation, a)  # (a R) R^T = a
  assert np.allclose(found, rotation.T, atol=1e-10)
  assert np.allclose(found @ found.T, np.eye(H), atol=1e-10)


def test_aligned_pooling_is_lossless_for_rotated_copies():
  rng = np.random.default_rng(1)
  base = rng.standard_normal((D * 4, H))
  heads = [base @ _random_rotation(rng, H) for _ in range(N)]
  kernel = np.concatenate(heads, axis=1)
  rotations = pooling.head_rotations(kernel, N, 1)
  aligned = pooling.rotate_columns(kernel, rotations)
  pooled = pooling.mean_pool(aligned, N, 1)
  assert pooling.pooling_error(aligned, pooled, N, 1) < 1e-6  # float32 pooling
  assert pooling.pooling_error(kernel, pooling.mean_pool(kernel, N, 1), N, 1) > 0.3


def _attention(x, y, q, k, v, o, num_heads):
  """Plain multi-head attention (no scaling, as T5): per head softmax(x Q_n (y K_n)^T) y V_n O_n."""
  out = 0
  for n in range(num_heads):
    cols = slice(n * H, (n + 1) * H)
    scores = (x @ q[:, cols]) @ (y @ k[:, cols]).T
    weights = np.exp(scores - scores.max(-1, keepdims=True))
    weights /= weights.sum(-1, keepdims=True)
    out = out + weights @ (y @ v[:, cols]) @ o[cols]
  return out


def test_rotation_preserves_the_attention_function():
  rng = np.random.default_rng(2)
  q, k, v = (rng.standard_normal((D, N * H)) for _ in range(3))
  o = rng.standard_normal((N * H, D))
  x, y = rng.standard_normal((6, D)), rng.standard_normal((7, D))
  qk = np.stack([_random_rotation(rng, H) for _ in range(N)])
  vo = np.stack([_random_rotation(rng, H) for _ in range(N)])
  rotated = pooling.rotate_attention(q, k, v, o, qk, vo)
  assert np.allclose(_attention(x, y, q, k, v, o, N), _attention(x, y, *rotated, N), atol=1e-10)
  assert not np.allclose(rotated[1], k)


def test_aligned_spreads_less_than_mean_on_random_heads():
  rng = np.random.default_rng(3)
  q, k, v = (rng.standard_normal((16, N * H)).astype(np.float32) for _ in range(3))
  o = rng.standard_normal((N * H, 16)).astype(np.float32)
  qk = pooling.head_rotations(k, N, 2)
  aligned_k = pooling.rotate_columns(k, qk)
  aligned_error = pooling.pooling_error(aligned_k, pooling.mean_pool(aligned_k, N, 2), N, 2)
  mean_error = pooling.pooling_error(k, pooling.mean_pool(k, N, 2), N, 2)
  assert aligned_error < mean_error
  q2, k2, v2, o2 = pooling.align_attention(q, k, v, o, N, 2)
  assert k2.shape == (16, 2 * H) and v2.shape == (16, 2 * H)
  assert q2.shape == q.shape and o2.shape == o.shape and q2.dtype == np.float32
  with pytest.raises(ValueError, match="multi-head source"):
    pooling.align_attention(q, k[:, :2 * H], v, o, N, 1)
