"""Grouped attention against a plain multi-head reference that repeats K/V to N heads."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gqa_t5.model import grouping
from gqa_t5.model.attention import GroupedAttention

B, T, S, D, N, H = 3, 5, 7, 12, 4, 8


def reference_attention(params, inputs_q, inputs_kv, mask, bias, num_kv_heads):
  """Per-head numpy MHA; query head n reads key/value head grouping.kv_head_of(n)."""
  q = np.asarray(inputs_q) @ np.asarray(params["query"]["kernel"])
  k = np.asarray(inputs_kv) @ np.asarray(params["key"]["kernel"])
  v = np.asarray(inputs_kv) @ np.asarray(params["value"]["kernel"])
  q = q.reshape(B, T, N, H)
  k, v = k.reshape(B, S, num_kv_heads, H), v.reshape(B, S, num_kv_heads, H)
  heads = []
  for n in range(N):
    kv = grouping.kv_head_of(n, N, num_kv_heads)
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
      for sub in jax.core.jaxprs_in_params(eqn.params):
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
