"""Token cross-entropy as T5X computes it: label smoothing, z-loss, weights, normalising factor."""

from __future__ import annotations

from typing import Optional, Tuple, Union

import jax
import jax.numpy as jnp
import numpy as np

# T5X's special loss normalising factors, by name.
NUM_REAL_TARGET_TOKENS = "NUM_REAL_TARGET_TOKENS"
NUM_TOTAL_TARGET_TOKENS = "NUM_TOTAL_TARGET_TOKENS"
AVERAGE_PER_SEQUENCE = "AVERAGE_PER_SEQUENCE"
_SPECIAL_FACTORS = (NUM_REAL_TARGET_TOKENS, NUM_TOTAL_TARGET_TOKENS, AVERAGE_PER_SEQUENCE)

LossNormalizingFactor = Optional[Union[float, int, str]]


def token_cross_entropy(logits: jnp.ndarray, targets: jnp.ndarray, label_smoothing: float = 0.0,
                        z_loss: float = 0.0) -> Tuple[jnp.ndarray, jnp.ndarray]:
  """Per-token loss [B, T] (z-loss included) and z-loss [B, T].

  Equivalent to T5X's one-hot formulation, minus the constant entropy of the smoothed target, but
  without materialising a [B, T, vocab] one-hot array.
  """
  logits = logits.astype(jnp.float32)
  vocab = logits.shape[-1]
  log_z = jax.nn.logsumexp(logits, axis=-1)                                  # [B, T]
  target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
  nll = log_z - target_logit                                                 # [B, T]
  if label_smoothing:
    confidence = 1.0 - label_smoothing
    low_confidence = label_smoothing / (vocab - 1)
    mean_nll_all = log_z - jnp.mean(logits, axis=-1)                         # -mean log p
    nll = confidence * nll + low_confidence * (vocab * mean_nll_all - nll)
    # Subtract the smoothed target's entropy so a perfect prediction scores zero (as T5X).
    nll = nll + (confidence * np.log(confidence)
                 + (vocab - 1) * low_confidence * np.log(low_confidence + 1e-20))
  token_z_loss = z_loss * jnp.square(log_z)
  return nll + token_z_loss, token_z_loss


def weighted_cross_entropy(logits: jnp.ndarray, targets: jnp.ndarray,
                           weights: Optional[jnp.ndarray] = None, label_smoothing: float = 0.0,
                           z_loss: float = 0.0,
                           loss_normalizing_factor: LossNormalizingFactor = None):
  """(loss, z_loss, weight_sum) summed over tokens, divided by the normalising factor if any."""
  loss, token_z = token_cross_entropy(logits, targets, label_smoothing, z_loss)
  if weights is None:
    weights = jnp.ones(targets.shape, jnp.float32)
  weights = weights.astype(jnp.float32)
  weight_sum = jnp.sum(weights)
  factor = loss_normalizing_factor
  if isinstance(factor, str):
    if factor not in _SPECIAL_FACTORS:
      raise ValueError(f"unknown loss_normalizing_factor {factor!r}; use a number or one of "
                       f"{_SPECIAL_FACTORS}")
    if factor == NUM_REAL_TARGET_TOKENS:
      factor = weight_sum
    elif factor == NUM_TOTAL_TARGET_TOKENS:
      factor = jnp.float32(np.prod(targets.shape))
    else:  # every sequence counts once, whatever its length
      per_sequence = jnp.maximum(jnp.sum(weights, axis=-1, keepdims=True), 1e-8)
      weights = weights / per_sequence
      factor = jnp.float32(targets.shape[0])
  loss = jnp.sum(loss * weights)
  token_z = jnp.sum(token_z * weights)
  if factor is not None:
    loss, token_z = loss / factor, token_z / factor
  return loss, token_z, weight_sum


def sequence_log_likelihood(logits: jnp.ndarray, targets: jnp.ndarray,
                            weights: Optional[jnp.ndarray] = None) -> jnp.ndarray:
  """Sum over tokens of log p(target) [B] (T5X's `score_batch`)."""
  log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  token_log_probs = jnp.take_along_axis(log_probs, targets[..., None], axis=-1)[..., 0]
  if weights is not None:
    token_log_probs = token_log_probs * weights
  return jnp.sum(token_log_probs, axis=-1)
