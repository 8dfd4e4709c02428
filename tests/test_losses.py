"""T5X's token cross-entropy: label smoothing, z-loss, weights and normalising factors."""

import jax.numpy as jnp
import numpy as np
import pytest

from gqa_t5 import losses


def one_hot_reference(logits, targets, smoothing, z):
  """T5X's one-hot formulation, in numpy: per-token loss [B, T] and log Z [B, T]."""
  vocab = logits.shape[-1]
  confidence, low = 1 - smoothing, smoothing / (vocab - 1)
  soft = np.full(logits.shape, low)
  np.put_along_axis(soft, targets[..., None], confidence, axis=-1)
  log_z = np.log(np.exp(logits).sum(-1))
  log_p = logits - log_z[..., None]
  constant = -(confidence * np.log(confidence) + (vocab - 1) * low * np.log(low)) if smoothing \
      else 0.0
  return -(soft * log_p).sum(-1) - constant + z * log_z ** 2, log_z


@pytest.fixture
def data():
  rng = np.random.RandomState(0)
  logits = rng.randn(2, 5, 11).astype(np.float32)
  targets = rng.randint(0, 11, (2, 5))
  weights = (rng.rand(2, 5) > 0.3).astype(np.float32)
  return logits, targets, weights


def test_loss_matches_one_hot_reference_with_smoothing_and_z_loss(data):
  logits, targets, weights = data
  smoothing, z = 0.1, 1e-4
  per_token, log_z = one_hot_reference(logits, targets, smoothing, z)
  loss, z_loss, weight_sum = losses.weighted_cross_entropy(
      jnp.asarray(logits), jnp.asarray(targets), jnp.asarray(weights), smoothing, z)
  np.testing.assert_allclose(loss, (per_token * weights).sum(), rtol=1e-5)
  np.testing.assert_allclose(z_loss, (z * log_z ** 2 * weights).sum(), rtol=1e-5)
  assert float(weight_sum) == weights.sum()
  normalised = losses.weighted_cross_entropy(jnp.asarray(logits), jnp.asarray(targets),
                                             jnp.asarray(weights), smoothing, z,
                                             losses.NUM_REAL_TARGET_TOKENS)[0]
  np.testing.assert_allclose(normalised, (per_token * weights).sum() / weights.sum(), rtol=1e-5)


def test_special_normalising_factors(data):
  logits, targets, weights = data
  per_token, _ = one_hot_reference(logits, targets, 0.0, 0.0)
  args = (jnp.asarray(logits), jnp.asarray(targets), jnp.asarray(weights), 0.0, 0.0)
  total = losses.weighted_cross_entropy(*args, losses.NUM_TOTAL_TARGET_TOKENS)[0]
  np.testing.assert_allclose(total, (per_token * weights).sum() / targets.size, rtol=1e-5)
  per_sequence = losses.weighted_cross_entropy(*args, losses.AVERAGE_PER_SEQUENCE)[0]
  expected = ((per_token * weights).sum(-1) / weights.sum(-1)).sum() / targets.shape[0]
  np.testing.assert_allclose(per_sequence, expected, rtol=1e-5)
  with pytest.raises(ValueError, match="unknown loss_normalizing_factor 'BOGUS'"):
    losses.weighted_cross_entropy(*args[:2], None, 0.0, 0.0, "BOGUS")


def test_sequence_log_likelihood_sums_weighted_log_probs(data):
  logits, targets, weights = data
  log_p = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  expected = (np.take_along_axis(log_p, targets[..., None], -1)[..., 0] * weights).sum(-1)
  got = losses.sequence_log_likelihood(jnp.asarray(logits), jnp.asarray(targets),
                                       jnp.asarray(weights))
  np.testing.assert_allclose(got, expected, rtol=1e-5)
