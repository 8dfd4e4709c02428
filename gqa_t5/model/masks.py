"""Attention masks [B, 1, T, S]: 1 where a query position may attend to a key position."""

from __future__ import annotations

from typing import Optional

import jax.numpy as jnp


def make_attention_mask(query_valid: jnp.ndarray, key_valid: jnp.ndarray,
                        dtype=jnp.float32) -> jnp.ndarray:
  """[B, T] and [B, S] booleans/ints -> [B, 1, T, S]."""
  mask = jnp.logical_and(query_valid[:, :, None] != 0, key_valid[:, None, :] != 0)
  return mask[:, None].astype(dtype)


def make_segment_mask(query_segments: jnp.ndarray, key_segments: jnp.ndarray,
                      dtype=jnp.float32) -> jnp.ndarray:
  """Packed examples attend only within their own segment: [B, 1, T, S]."""
  return (query_segments[:, :, None] == key_segments[:, None, :])[:, None].astype(dtype)


def make_causal_mask(length: int, dtype=jnp.float32) -> jnp.ndarray:
  """[1, 1, T, T] lower-triangular."""
  positions = jnp.arange(length)
  return (positions[None, :] <= positions[:, None])[None, None].astype(dtype)


def combine_masks(*masks: Optional[jnp.ndarray], dtype=jnp.float32) -> Optional[jnp.ndarray]:
  present = [m for m in masks if m is not None]
  if not present:
    return None
  combined = present[0] > 0
  for mask in present[1:]:
    combined = jnp.logical_and(combined, mask > 0)
  return combined.astype(dtype)


def encoder_mask(tokens: jnp.ndarray, segment_ids: Optional[jnp.ndarray] = None, dtype=jnp.float32):
  mask = make_attention_mask(tokens > 0, tokens > 0, dtype)
  if segment_ids is not None:
    mask = combine_masks(mask, make_segment_mask(segment_ids, segment_ids, dtype), dtype=dtype)
  return mask


def decoder_mask(target_tokens: jnp.ndarray, segment_ids: Optional[jnp.ndarray] = None,
                 dtype=jnp.float32) -> jnp.ndarray:
  """Causal, non-padding (and same-segment when packed) mask of the decoder self-attention."""
  mask = combine_masks(make_attention_mask(target_tokens > 0, target_tokens > 0, dtype),
                       make_causal_mask(target_tokens.shape[1], dtype), dtype=dtype)
  if segment_ids is not None:
    mask = combine_masks(mask, make_segment_mask(segment_ids, segment_ids, dtype), dtype=dtype)
  return mask


def encoder_decoder_mask(target_tokens: jnp.ndarray, input_tokens: jnp.ndarray,
                         target_segment_ids: Optional[jnp.ndarray] = None,
                         input_segment_ids: Optional[jnp.ndarray] = None,
                         dtype=jnp.float32) -> jnp.ndarray:
  mask = make_attention_mask(target_tokens > 0, input_tokens > 0, dtype)
  if target_segment_ids is not None and input_segment_ids is not None:
    mask = combine_masks(mask, make_segment_mask(target_segment_ids, input_segment_ids, dtype),
                         dtype=dtype)
  return mask
