"""T5's span-corruption objective as a seqio preprocessor.

A text is tokenized, the token stream of consecutive documents is cut into chunks, and in
each chunk about `noise_density` of the tokens, in spans of mean length
`mean_noise_span_length`, are "noise". The inputs keep the other tokens and put one
sentinel (<extra_id_0>, <extra_id_1>, ...; the highest ids of the vocabulary) where each
noise span was; the targets list each sentinel followed by the span it stands for:

  tokens   A B C D E F G       (C D and F are noise)
  inputs   A B <0> E <1> G
  targets  <0> C D <1> F

Chunks are as long as possible while the inputs, with EOS, still fit the requested input
length: 512 inputs -> 568 raw tokens -> 114 targets, T5's pretraining lengths.
"""

from __future__ import annotations

from typing import Mapping, Optional

import seqio
import tensorflow as tf

NOISE_DENSITY = 0.15
MEAN_NOISE_SPAN_LENGTH = 3.0


def _noise_counts(num_tokens: int, noise_density: float,
                  mean_noise_span_length: float) -> tuple[int, int]:
  """(noise tokens, noise spans) of a chunk; the same arithmetic as `noise_mask`."""
  num_noise = min(max(int(round(num_tokens * noise_density)), 1), num_tokens - 1)
  num_spans = max(int(round(num_noise / mean_noise_span_length)), 1)
  return num_noise, min(num_spans, num_noise, num_tokens - num_noise)


def span_corruption_lengths(
    inputs_length: int, noise_density: float = NOISE_DENSITY,
    mean_noise_span_length: float = MEAN_NOISE_SPAN_LENGTH) -> tuple[int, int]:
  """(raw tokens per chunk, targets length with EOS) for `inputs_length` (with EOS).

  The longest chunk whose corrupted inputs (kept tokens + one sentinel per span + EOS)
  fit in `inputs_length`; the targets then hold every noise token, one sentinel per
  span and EOS.
  """
  if inputs_length < 3:
    raise ValueError(f"span corruption needs inputs_length >= 3, got {inputs_length}.")

  def lengths(num_tokens):
    num_noise, num_spans = _noise_counts(num_tokens, noise_density, mean_noise_span_length)
    return (num_tokens - num_noise + num_spans + 1, num_noise + num_spans + 1)

  num_tokens = 2
  while lengths(num_tokens + 1)[0] <= inputs_length:
    num_tokens += 1
  return num_tokens, lengths(num_tokens)[1]


def check_targets_length(inputs_length: int, targets_length: Optional[int],
                         noise_density: float = NOISE_DENSITY,
                         mean_noise_span_length: float = MEAN_NOISE_SPAN_LENGTH) -> int:
  """The minimum targets length (with EOS) span corruption needs for `inputs_length`; raises
  ValueError naming both lengths when `targets_length` is shorter (targets would be cut)."""
  _, needed = span_corruption_lengths(inputs_length, noise_density, mean_noise_span_length)
  if targets_length is not None and targets_length < needed:
    raise ValueError(
        f"span corruption with inputs length {inputs_length} (noise density {noise_density}, "
        f"mean span {mean_noise_span_length}) makes targets of {needed} tokens, but the "
        f"targets length is {targets_length}: the targets would be cut. Set "
        f"TASK_FEATURE_LENGTHS['targets'] >= {needed}.")
  return needed


def _random_partition(total: tf.Tensor, parts: tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
  """Random lengths (each >= 1) of `parts` pieces that add up to `total`."""
  # Choose parts-1 distinct cut points among the total-1 gaps between items.
  gaps = tf.random.experimental.stateless_shuffle(tf.range(1, total), seed=seed)
  cuts = tf.sort(gaps[:parts - 1])
  bounds = tf.concat([[0], cuts, [total]], axis=0)
  return bounds[1:] - bounds[:-1]


def noise_mask(num_tokens: tf.Tensor, seeds: tf.Tensor,
               noise_density: float = NOISE_DENSITY,
               mean_noise_span_length: float = MEAN_NOISE_SPAN_LENGTH) -> tf.Tensor:
  """A boolean [num_tokens] mask; True marks noise. Always starts with a kept token.

  Args:
    num_tokens: scalar int32 >= 2.
    seeds: [2, 2] int32, two stateless seeds (noise spans, kept spans).
  """
  n = tf.cast(num_tokens, tf.float64)  # float64: the same rounding as the Python lengths.
  num_noise = tf.cast(tf.round(n * noise_density), tf.int32)
  num_noise = tf.clip_by_value(num_noise, 1, num_tokens - 1)
  num_spans = tf.cast(
      tf.round(tf.cast(num_noise, tf.float64) / mean_noise_span_length), tf.int32)
  num_spans = tf.minimum(tf.maximum(num_spans, 1),
                         tf.minimum(num_noise, num_tokens - num_noise))
  noise_lengths = _random_partition(num_noise, num_spans, seeds[0])
  kept_lengths = _random_partition(num_tokens - num_noise, num_spans, seeds[1])
  # kept span 0, noise span 0, kept span 1, noise span 1, ...
  span_lengths = tf.reshape(tf.stack([kept_lengths, noise_lengths], axis=1), [-1])
  span_is_noise = tf.tile([False, True], [num_spans])
  return tf.repeat(span_is_noise, span_lengths)


def _replace_spans_with_sentinels(tokens: tf.Tensor, drop: tf.Tensor,
                                  vocab_size: int) -> tf.Tensor:
  """Each run of True in `drop` becomes one sentinel: vocab_size-1, vocab_size-2, ..."""
  previous = tf.concat([[False], drop[:-1]], axis=0)
  starts = tf.logical_and(drop, tf.logical_not(previous))
  span_index = tf.cumsum(tf.cast(starts, tokens.dtype)) - 1
  sentinels = vocab_size - 1 - span_index
  with_sentinels = tf.where(starts, sentinels, tokens)
  return tf.boolean_mask(with_sentinels, tf.logical_or(starts, tf.logical_not(drop)))


def corrupt_tokens(tokens: tf.Tensor, seeds: tf.Tensor, vocab_size: int,
                   noise_density: float = NOISE_DENSITY,
                   mean_noise_span_length: float = MEAN_NOISE_SPAN_LENGTH
                   ) -> tuple[tf.Tensor, tf.Tensor]:
  """(inputs, targets) of one chunk of >= 2 tokens (no EOS)."""
  mask = noise_mask(tf.size(tokens), seeds, noise_density, mean_noise_span_length)
  inputs = _replace_spans_with_sentinels(tokens, mask, vocab_size)
  targets = _replace_spans_with_sentinels(tokens, tf.logical_not(mask), vocab_size)
  return inputs, targets


def _chunk_token_stream(dataset: tf.data.Dataset, chunk_length: int) -> tf.data.Dataset:
  """Concatenates the 'targets' tokens of consecutive examples and cuts them into chunks."""
  tokens = dataset.map(lambda ex: ex["targets"], num_parallel_calls=tf.data.AUTOTUNE)
  return tokens.unbatch().batch(chunk_length)


def span_corruption(dataset: tf.data.Dataset,
                    sequence_length: Optional[Mapping[str, int]],
                    output_features: Mapping[str, seqio.Feature],
                    default_inputs_length: int = 512,
                    noise_density: float = NOISE_DENSITY,
                    mean_noise_span_length: float = MEAN_NOISE_SPAN_LENGTH
                    ) -> tf.data.Dataset:
  """Seqio preprocessor: tokenized 'targets' documents -> span-corrupted examples.

  Runs after `seqio.preprocessors.tokenize` (text rekeyed to 'targets', no EOS yet) and
  before `seqio.preprocessors.append_eos_after_trim`. Random choices take seqio's seeds,
  so a fixed `get_dataset(seed=...)` gives the same examples.
  """
  lengths = dict(sequence_length or {})
  for feature, length in lengths.items():
    if length is not None and length <= 0:
      raise ValueError(f"span corruption: the {feature!r} length must be positive, got {length}")
  inputs_length = lengths.get("inputs") or default_inputs_length
  chunk_length, _ = span_corruption_lengths(inputs_length, noise_density,
                                            mean_noise_span_length)
  check_targets_length(inputs_length, lengths.get("targets"), noise_density,
                       mean_noise_span_length)
  vocab_size = output_features["targets"].vocabulary.vocab_size
  chunks = _chunk_token_stream(dataset, chunk_length)
  # A lone final token cannot be split into kept and noise parts.
  chunks = chunks.filter(lambda tokens: tf.size(tokens) >= 2)

  @seqio.map_over_dataset(num_seeds=2)
  def corrupt(tokens, seeds):
    inputs, targets = corrupt_tokens(tokens, seeds, vocab_size, noise_density,
                                     mean_noise_span_length)
    return {"inputs": inputs, "targets": targets}

  return corrupt(chunks)
