"""The model boundary's one check of a batch: features present, integer ids of rank 2, one
batch size, one length per side, ids inside the vocabulary. Every message names the feature,
the expected and the actual value. `EncoderDecoderModel` runs it before any loss, score or decode.
"""

from __future__ import annotations

from typing import Mapping, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np

Batch = Mapping[str, jnp.ndarray]

_TOKEN_FEATURES = ("encoder_input_tokens", "decoder_input_tokens", "decoder_target_tokens")
# Features that share a length with the first of their group.
_FEATURE_GROUPS = (("encoder_input_tokens", "encoder_segment_ids", "encoder_positions"),
                   ("decoder_target_tokens", "decoder_input_tokens", "decoder_segment_ids",
                    "decoder_positions", "decoder_loss_weights"))


def _min_max(x) -> Tuple[int, int]:
  """Smallest and largest id, reduced where the data lies (the shards this process holds)."""
  if not isinstance(x, jax.Array):
    return int(np.min(x)), int(np.max(x))
  parts = [x] if x.is_fully_addressable else [s.data for s in x.addressable_shards]
  lows, highs = jax.device_get(([p.min() for p in parts], [p.max() for p in parts]))
  return int(min(lows)), int(max(highs))


def _check_feature(name: str, x, vocab_size: Optional[int]) -> Tuple[int, int]:
  """Rank, dtype, emptiness and (when concrete) id range of one feature; returns its shape."""
  if not hasattr(x, "dtype"):
    raise TypeError(f"batch feature {name!r} must be an array, got {type(x).__name__}")
  if x.ndim != 2:
    raise ValueError(f"batch feature {name!r} must have rank 2 [batch, length], got shape "
                     f"{tuple(x.shape)} (rank {x.ndim})")
  weights = name == "decoder_loss_weights"
  integer, floating = (jnp.issubdtype(x.dtype, kind) for kind in (jnp.integer, jnp.floating))
  if not (integer or weights and floating):
    raise TypeError(f"batch feature {name!r} must hold {'numbers' if weights else 'integer ids'}, "
                    f"got dtype {x.dtype} (ids are not cast: a float id would be truncated)")
  if 0 in x.shape:
    raise ValueError(f"batch feature {name!r} is empty: shape {tuple(x.shape)}, expected at least "
                     f"one example and one position")
  if name in _TOKEN_FEATURES and not isinstance(x, jax.core.Tracer):  # no values under tracing
    low, high = _min_max(x)
    if low < 0 or (vocab_size is not None and high >= vocab_size):
      raise ValueError(f"batch feature {name!r} has ids outside [0, {vocab_size or 'inf'}) "
                       f"(vocab_size): min {low}, max {high}")
  return tuple(x.shape)


def check_batch(batch: Batch, required: Sequence[str], vocab_size: Optional[int] = None) -> None:
  """The model's one check of a batch, before any loss, score or decode (every message names
  the feature, the expected and the actual value).

  `required` features must be present (KeyError). Known features must be rank 2, non-empty,
  integer (TypeError: a float id would be truncated; `decoder_loss_weights` may be float), share
  one batch size, and share one length per side (encoder, decoder). Token ids must lie in
  [0, vocab_size): checked on the host when the arrays are concrete, skipped under tracing.
  """
  missing = [k for k in required if k not in batch]
  if missing:
    raise KeyError(f"batch lacks feature(s) {missing}; it has {sorted(batch)}")
  first = None  # (name, batch size)
  for group in _FEATURE_GROUPS:
    reference = None  # (name, length)
    for name in (k for k in group if k in batch):
      size, length = _check_feature(name, batch[name], vocab_size)
      first = first or (name, size)
      reference = reference or (name, length)
      if size != first[1]:
        raise ValueError(f"batch feature {name!r} has batch size {size}, expected {first[1]} "
                         f"(the batch size of {first[0]!r})")
      if length != reference[1]:
        raise ValueError(f"batch feature {name!r} has length {length}, expected "
                         f"{reference[1]} (the length of {reference[0]!r})")
