"""Attention masks [B, 1, T, S]: padding, causality and packed segments."""

import jax.numpy as jnp
import numpy as np

from gqa_t5.model import masks


def test_padding_mask_blocks_pad_queries_and_keys():
  mask = masks.make_attention_mask(jnp.array([[1, 1, 0]]), jnp.array([[1, 0]]))
  assert mask.shape == (1, 1, 3, 2)
  np.testing.assert_array_equal(np.asarray(mask[0, 0]), [[1, 0], [1, 0], [0, 0]])


def test_causal_mask_is_lower_triangular():
  np.testing.assert_array_equal(np.asarray(masks.make_causal_mask(3)[0, 0]),
                                np.tril(np.ones((3, 3))))


def test_decoder_mask_is_causal_non_padding_and_within_segments():
  targets = jnp.array([[5, 6, 7, 8, 0]])
  segments = jnp.array([[1, 1, 2, 2, 0]])
  mask = np.asarray(masks.decoder_mask(targets, segments)[0, 0])
  expected = np.array([[1, 0, 0, 0, 0],
                       [1, 1, 0, 0, 0],
                       [0, 0, 1, 0, 0],
                       [0, 0, 1, 1, 0],
                       [0, 0, 0, 0, 0]])
  np.testing.assert_array_equal(mask, expected)
  np.testing.assert_array_equal(np.asarray(masks.decoder_mask(targets)[0, 0])[3], [1, 1, 1, 1, 0])


def test_encoder_and_cross_masks_respect_segments_and_padding():
  inputs = jnp.array([[3, 4, 5, 0]])
  input_segments = jnp.array([[1, 1, 2, 0]])
  enc = np.asarray(masks.encoder_mask(inputs, input_segments)[0, 0])
  np.testing.assert_array_equal(enc[0], [1, 1, 0, 0])
  np.testing.assert_array_equal(enc[2], [0, 0, 1, 0])
  np.testing.assert_array_equal(enc[3], [0, 0, 0, 0])
  targets = jnp.array([[7, 8, 0]])
  target_segments = jnp.array([[1, 2, 0]])
  cross = np.asarray(masks.encoder_decoder_mask(targets, inputs, target_segments,
                                                input_segments)[0, 0])
  np.testing.assert_array_equal(cross, [[1, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 0]])


def test_combine_masks_ignores_none_and_keeps_dtype():
  a = jnp.ones((1, 1, 2, 2))
  b = jnp.array([[[[1.0, 0.0], [1.0, 1.0]]]])
  assert masks.combine_masks(None, None) is None
  combined = masks.combine_masks(a, None, b, dtype=jnp.bfloat16)
  assert combined.dtype == jnp.bfloat16
  np.testing.assert_array_equal(np.asarray(combined, np.float32), np.asarray(b))
