"""The model wrapper T5X users know: loss, scoring and prediction over the network.

`EncoderDecoderModel` holds a flax module with T5X's `EncoderDecoder` interface (ours, or any
t5x-compatible one) and adds what training and evaluation need; it imports no TensorFlow.
"""

from __future__ import annotations

import functools
from typing import Any, Mapping, Optional, Tuple

import flax
import jax
import jax.numpy as jnp
from flax import linen as nn
from flax import traverse_util

from gqa_t5 import decoding, losses

Batch = Mapping[str, jnp.ndarray]
PyTree = Any

_REQUIRED_TRAIN_KEYS = ("encoder_input_tokens", "decoder_input_tokens", "decoder_target_tokens")


def _check_batch(batch: Batch, keys) -> None:
  missing = [k for k in keys if k not in batch]
  if missing:
    raise KeyError(f"batch lacks feature(s) {missing}; it has {sorted(batch)}")


class EncoderDecoderModel:
  """Loss, `score_batch` and `predict_batch` for an encoder-decoder module.

  Args:
    module: a flax module with `encode`, `decode` and `__call__` as T5X's `EncoderDecoder`.
    input_vocabulary / output_vocabulary: seqio vocabularies (optional; only kept for callers).
    z_loss, label_smoothing, loss_normalizing_factor: as T5X's `EncoderDecoderModel`.
    eos_id: the end-of-sequence id (T5: 1).
  """

  def __init__(self, module: nn.Module, input_vocabulary=None, output_vocabulary=None,
               z_loss: float = 1e-4, label_smoothing: float = 0.0,
               loss_normalizing_factor: losses.LossNormalizingFactor = None, eos_id: int = 1):
    self.module = module
    self.input_vocabulary = input_vocabulary
    self.output_vocabulary = output_vocabulary
    self.z_loss = z_loss
    self.label_smoothing = label_smoothing
    self.loss_normalizing_factor = loss_normalizing_factor
    self.eos_id = eos_id

  # ---- parameters ------------------------------------------------------------------------------

  def get_initial_variables(self, rng: jnp.ndarray, input_shapes: Mapping[str, Tuple[int, ...]],
                            input_types: Optional[Mapping[str, Any]] = None) -> PyTree:
    """`params` and `params_axes` (T5X's signature).

    No parameter's shape depends on the batch size or the lengths, so the module is initialised
    on [1, 1] token inputs whatever `input_shapes` says: initialising never runs (or compiles) a
    full-size forward pass. `input_shapes` must still name the token features, as in T5X.
    """
    del input_types  # token ids are int32 here whatever the batch will hold
    for name in ("encoder_input_tokens", "decoder_input_tokens"):
      if name not in input_shapes:
        raise KeyError(f"input_shapes lacks {name!r}; it has {sorted(input_shapes)}")
    tokens = jnp.ones((1, 1), jnp.int32)
    return self.module.init(rng, tokens, tokens, tokens, enable_dropout=False)

  # ---- training and scoring ---------------------------------------------------------------------

  def _logits(self, params, batch: Batch, dropout_rng=None):
    _check_batch(batch, _REQUIRED_TRAIN_KEYS)
    rngs = {"dropout": dropout_rng} if dropout_rng is not None else None
    return self.module.apply(
        {"params": params}, batch["encoder_input_tokens"], batch["decoder_input_tokens"],
        batch["decoder_target_tokens"], encoder_segment_ids=batch.get("encoder_segment_ids"),
        decoder_segment_ids=batch.get("decoder_segment_ids"),
        encoder_positions=batch.get("encoder_positions"),
        decoder_positions=batch.get("decoder_positions"), enable_dropout=dropout_rng is not None,
        rngs=rngs)

  def loss_fn(self, params, batch: Batch, dropout_rng=None):
    """(loss, metrics): summed weighted cross-entropy (+ z-loss), T5X's conventions."""
    logits = self._logits(params, batch, dropout_rng)
    targets = batch["decoder_target_tokens"]
    weights = batch.get("decoder_loss_weights")
    if weights is None:
      weights = (targets > 0).astype(jnp.float32)
    loss, z_loss, weight_sum = losses.weighted_cross_entropy(
        logits, targets, weights, self.label_smoothing, self.z_loss,
        self.loss_normalizing_factor)
    correct = (jnp.argmax(logits, -1) == targets).astype(jnp.float32) * weights
    metrics = {"loss": loss, "z_loss": z_loss, "weight_sum": weight_sum,
               "accuracy_count": jnp.sum(correct), "num_sequences": jnp.float32(targets.shape[0])}
    return loss, metrics

  def score_batch(self, params, batch: Batch) -> jnp.ndarray:
    """Log-likelihood of each target sequence [B] (non-padding or `decoder_loss_weights` tokens)."""
    logits = self._logits(params, batch)
    targets = batch["decoder_target_tokens"]
    weights = batch.get("decoder_loss_weights")
    if weights is None:
      weights = (targets > 0).astype(jnp.float32)
    return losses.sequence_log_likelihood(logits, targets, weights)

  # ---- prediction --------------------------------------------------------------------------------

  def predict_batch(self, params, batch: Batch, rng: Optional[jnp.ndarray] = None,
                    **decoder_params) -> jnp.ndarray:
    """Decoded tokens [B, L] (the best beam for beam search)."""
    return self.predict_batch_with_aux(params, batch, rng, **decoder_params)[0]

  def predict_batch_with_aux(self, params, batch: Batch, rng: Optional[jnp.ndarray] = None, *,
                             method: str = "greedy", max_decode_length: Optional[int] = None,
                             temperature: float = 1.0, topk: int = 0, num_decodes: int = 4,
                             alpha: float = 0.6, return_all_decodes: bool = False):
    """(tokens, {'scores': ...}) with method 'greedy' (the paper's), 'sample' or 'beam'.

    Greedy and sampled scores are log-likelihoods; beam scores are length-penalised
    (alpha = 0 gives log-likelihoods). `max_decode_length` defaults to the length of
    `decoder_input_tokens` when the batch has it.
    """
    _check_batch(batch, ("encoder_input_tokens",))
    if max_decode_length is None:
      if "decoder_input_tokens" not in batch:
        raise ValueError("predict_batch needs max_decode_length or decoder_input_tokens")
      max_decode_length = batch["decoder_input_tokens"].shape[1]
    if method not in ("greedy", "sample", "beam"):
      raise ValueError(f"unknown decoding method {method!r}: use 'greedy', 'sample' or 'beam'")
    if rng is None:
      rng = jax.random.PRNGKey(0)
    tokens, scores = self._predict_jit(params, batch["encoder_input_tokens"], rng, method,
                                       int(max_decode_length), float(temperature), int(topk),
                                       int(num_decodes), float(alpha))
    if method == "beam" and not return_all_decodes:
      tokens, scores = tokens[:, 0], scores[:, 0]
    return tokens, {"scores": scores}

  @functools.partial(jax.jit, static_argnums=(0, 4, 5, 6, 7, 8, 9))
  def _predict_jit(self, params, encoder_input_tokens, rng, method, max_decode_length,
                   temperature, topk, num_decodes, alpha):
    batch_size = encoder_input_tokens.shape[0]
    beams = num_decodes if method == "beam" else 1
    encoded = self.module.apply({"params": params}, encoder_input_tokens, enable_dropout=False,
                                method=self.module.encode)
    cache = self.init_cache(params, batch_size * beams, encoder_input_tokens.shape[1],
                            max_decode_length)
    if beams > 1:
      encoded, encoder_input_tokens = decoding.expand_to_beams(
          (encoded, encoder_input_tokens), beams)
    cache = self.prefill_cross_attention(params, cache, encoded, encoder_input_tokens)
    tokens_to_logits = self.tokens_to_logits_fn(params, encoded, encoder_input_tokens)
    if method == "beam":
      return decoding.beam_search(cache, tokens_to_logits, batch_size, max_decode_length,
                                  beams, alpha, self.eos_id)
    return decoding.temperature_sample(
        cache, tokens_to_logits, batch_size, max_decode_length, self.eos_id, rng,
        temperature=0.0 if method == "greedy" else temperature, topk=topk)

  def init_cache(self, params, batch_size: int, input_length: int, max_decode_length: int):
    """Zeroed decoding caches (shapes only: no forward pass is run)."""
    def make():
      return self.module.apply(
          {"params": params}, jnp.ones((batch_size, input_length), jnp.int32),
          jnp.ones((batch_size, max_decode_length), jnp.int32),
          jnp.ones((batch_size, max_decode_length), jnp.int32), decode=True,
          enable_dropout=False, mutable=["cache"])[1]["cache"]
    shapes = jax.eval_shape(make)
    return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)

  def prefill_cross_attention(self, params, cache, encoded, encoder_input_tokens):
    """Projects the encoder output into every cross-attention cache, once per sequence.

    Runs one decoder step (which fills the caches) and rewinds the self-attention position, so
    the decoding loop's steps read the cached keys/values with no branch and no copy.
    """
    tokens = jnp.zeros((encoded.shape[0], 1), jnp.int32)
    _, variables = self.module.apply(
        {"params": params, "cache": cache}, encoded, encoder_input_tokens, tokens, tokens + 1,
        enable_dropout=False, decode=True, mutable=["cache"], method=self.module.decode)
    rewound = traverse_util.flatten_dict(flax.core.unfreeze(variables["cache"]))
    for path in rewound:
      if path[-1] == "cache_index":
        rewound[path] = jnp.zeros_like(rewound[path])
    return traverse_util.unflatten_dict(rewound)

  def tokens_to_logits_fn(self, params, encoded, encoder_input_tokens):
    """The one-step function decoding loops call: (tokens [B, 1], cache) -> (logits [B, V], cache).

    The cache must have been through `prefill_cross_attention`.
    """
    def tokens_to_logits(tokens, cache):
      logits, variables = self.module.apply(
          {"params": params, "cache": cache}, encoded, encoder_input_tokens, tokens,
          jnp.ones_like(tokens), enable_dropout=False, decode=True, mutable=["cache"],
          method=self.module.decode, cross_kv_cached=True)
      return logits[:, 0], variables["cache"]
    return tokens_to_logits
