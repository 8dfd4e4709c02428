"""Grouped attention against a plain multi-head reference that repeats K/V to N heads.

float32 comparisons rely on tests/conftest.py's 'highest' matmul precision (TF32 on a GPU would
need tolerances too loose to catch a wrong head pairing); the bfloat16 tolerance is proven tight
by a test that a wrong pairing exceeds it.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.extend.core import jaxprs_in_params

from gqa_t5.model import grouping
from gqa_t5.model.attention import GroupedAttention, dot_product_attention

B, T, S, D, N, H = 3, 5, 7, 12, 4, 8


# bfloat16 activations vs the float32 reference, relative to the output's largest magnitude:
# measured 0.004-0.008; a wrong query/key-value pairing gives 0.9 or more.
BF16_RTOL = 0.03


def reference_attention(params, inputs_q, inputs_kv, mask, bias, num_kv_heads,
                        kv_head_of=grouping.kv_head_of):
  """Per-head numpy MHA; query head n reads key/value head kv_head_of(n, N, K)."""
  q = np.asarray(inputs_q) @ np.asarray(params["query"]["kernel"])
  k = np.asarray(inputs_kv) @ np.asarray(params["key"]["kernel"])
  v = np.asarray(inputs_kv) @ np.asarray(params["value"]["kernel"])
  q = q.reshape(B, T, N, H)
  k, v = k.reshape(B, S, num_kv_heads, H), v.reshape(B, S, num_kv_heads, H)
  heads = []
  for n in range(N):
    kv = kv_head_of(n, N, num_kv_heads)
    logits = np.einsum("bth,bsh->bts", q[:, :, n], k[:, :, kv]) + bias[0, n]
    logits = np.where(mask[:, 0] > 0, logits, -1e9)
    weights = np.exp(logits - logits.max(-1, keepdims=True))
    weights /= weights.sum(-1, keepdims=True)
    heads.append(np.einsum("bts,bsh->bth", weights, v[:, :, kv]))
  context = np.stack(heads, axis=2).reshape(B, T, N * H)
  return context @ np.asarray(params["out"]["kernel"])


@pytest.mark.parametrize("num_kv_heads", [N, 2, 1])
def test_grouped_attention_equals_repeated_kv_reference(num_kv_heads):
  rng = np.random.RandomState(num_kv_heads)
  inputs_q = rng.randn(B, T, D).astype(np.float32)
  inputs_kv = rng.randn(B, S, D).astype(np.float32)
  mask = (rng.rand(B, 1, T, S) > 0.3).astype(np.float32)
  mask[..., 0] = 1.0  # every query sees at least one key
  bias = rng.randn(1, N, T, S).astype(np.float32)
  layer = GroupedAttention(D, N, num_kv_heads, H)
  params = layer.init(jax.random.PRNGKey(0), inputs_q, inputs_kv, mask, bias)["params"]
  assert params["key"]["kernel"].shape == (D, num_kv_heads * H)
  ours = layer.apply({"params": params}, inputs_q, inputs_kv, mask, bias)
  expected = reference_attention(params, inputs_q, inputs_kv, mask, bias, num_kv_heads)
  np.testing.assert_allclose(np.asarray(ours), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("num_kv_heads", [2, 1])
def test_keys_and_values_are_never_materialised_at_full_head_count(num_kv_heads):
  """No intermediate of the grouped computation has S keys of N heads of width H."""
  inputs_q = jnp.ones((B, T, D))
  inputs_kv = jnp.ones((B, S, D))
  layer = GroupedAttention(D, N, num_kv_heads, H)
  params = layer.init(jax.random.PRNGKey(0), inputs_q, inputs_kv)["params"]
  jaxpr = jax.make_jaxpr(lambda p: layer.apply({"params": p}, inputs_q, inputs_kv))(params)
  shapes = []
  def collect(jaxpr):
    for eqn in jaxpr.eqns:
      shapes.extend(tuple(v.aval.shape) for v in eqn.outvars)
      for sub in jaxprs_in_params(eqn.params):
        collect(sub)
  collect(jaxpr.jaxpr)
  full = [s for s in shapes if S in s and N in s and H in s]
  assert not full, f"keys/values repeated to {N} heads: {full}"
  grouped = [s for s in shapes if s == (B, S, num_kv_heads, H)]
  assert grouped, "expected K-head keys/values [B, S, K, H] in the computation"


def test_mask_blocks_attention_to_masked_keys():
  rng = np.random.RandomState(0)
  inputs_q = rng.randn(B, T, D).astype(np.float32)
  inputs_kv = rng.randn(B, S, D).astype(np.float32)
  mask = np.ones((B, 1, T, S), np.float32)
  mask[..., 3:] = 0
  layer = GroupedAttention(D, N, 2, H)
  params = layer.init(jax.random.PRNGKey(0), inputs_q, inputs_kv, mask)["params"]
  changed_kv = inputs_kv.copy()
  changed_kv[:, 3:] = rng.randn(B, S - 3, D)
  before = layer.apply({"params": params}, inputs_q, inputs_kv, mask)
  after = layer.apply({"params": params}, inputs_q, changed_kv, mask)
  np.testing.assert_allclose(np.asarray(before), np.asarray(after), atol=1e-6)


def _wrong_pairing(n, num_heads, num_kv_heads):
  """Query head n paired with the next group's key/value head."""
  return (grouping.kv_head_of(n, num_heads, num_kv_heads) + 1) % num_kv_heads


@pytest.mark.parametrize("num_kv_heads", [N, 2])
def test_bfloat16_tolerance_is_tight_enough_to_catch_a_wrong_head_pairing(num_kv_heads):
  rng = np.random.RandomState(7 + num_kv_heads)
  inputs_q = rng.randn(B, T, D).astype(np.float32)
  inputs_kv = rng.randn(B, S, D).astype(np.float32)
  mask = np.ones((B, 1, T, S), np.float32)
  bias = rng.randn(1, N, T, S).astype(np.float32)
  layer = GroupedAttention(D, N, num_kv_heads, H, dtype=jnp.bfloat16)
  params = layer.init(jax.random.PRNGKey(1), inputs_q, inputs_kv, mask, bias)["params"]
  ours = np.asarray(layer.apply({"params": params}, inputs_q, inputs_kv, mask, bias), np.float32)
  expected = reference_attention(params, inputs_q, inputs_kv, mask, bias, num_kv_heads)
  wrong = reference_attention(params, inputs_q, inputs_kv, mask, bias, num_kv_heads,
                              kv_head_of=_wrong_pairing)
  scale = np.abs(expected).max()
  assert np.abs(ours - expected).max() <= BF16_RTOL * scale
  assert np.abs(ours - wrong).max() > 10 * BF16_RTOL * scale  # the tolerance would catch it


def test_core_is_shared_by_full_sequence_and_decode_step():
  """A decode step (T = 1 against the cache) is the same core: row t of the full-sequence
  result equals the core run on query t alone."""
  rng = np.random.RandomState(3)
  q = jnp.asarray(rng.randn(B, T, 2, N // 2, H), jnp.float32)      # [B, T, K, G, H]
  k = jnp.asarray(rng.randn(B, 2, S, H), jnp.float32)               # [B, K, S, H]
  v = jnp.asarray(rng.randn(B, 2, S, H), jnp.float32)
  bias = jnp.asarray(rng.randn(1, N, T, S), jnp.float32)
  mask = jnp.asarray(rng.rand(B, 1, T, S) > 0.3)
  full = dot_product_attention(q, k, v, mask=mask, bias=bias)
  for t in range(T):
    step = dot_product_attention(q[:, t:t + 1], k, v, mask=mask[:, :, t:t + 1],
                                 bias=bias[:, :, t:t + 1])
    np.testing.assert_allclose(np.asarray(step[:, 0]), np.asarray(full[:, t]), atol=1e-6)
