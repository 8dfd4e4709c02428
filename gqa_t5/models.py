"""The model wrapper T5X users know: loss, scoring and prediction over the network.

`EncoderDecoderModel` holds a flax module with T5X's `EncoderDecoder` interface (ours, or any
t5x-compatible one) and adds what training and evaluation need; it imports no TensorFlow.
"""

from __future__ import annotations

import copy
import functools
import numbers
from typing import Any, Callable, Dict, Mapping, Optional, Tuple

import flax
import jax
import jax.numpy as jnp
from flax import linen as nn
from flax import traverse_util

from gqa_t5 import batches, decoding, losses

Batch = Mapping[str, jnp.ndarray]
PyTree = Any
# (inputs=, cache=, tokens_to_logits=, eos_id=, num_decodes=, decode_rng=, **decoder_params) ->
# (sequences [B, num_decodes, L], scores [B, num_decodes]) best last: see gqa_t5/decoding.py.
DecodeFn = Callable[..., Tuple[jnp.ndarray, jnp.ndarray]]

_REQUIRED_TRAIN_KEYS = ("encoder_input_tokens", "decoder_input_tokens", "decoder_target_tokens")
def _loss_weights(batch: Batch) -> jnp.ndarray:
  """`decoder_loss_weights`, or 1 on every non-padding target token (T5X's default)."""
  if "decoder_loss_weights" in batch:
    return batch["decoder_loss_weights"]
  return (batch["decoder_target_tokens"] > 0).astype(jnp.float32)


def _positive_int(name: str, value) -> int:
  if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
    raise ValueError(f"{name} must be a positive integer, got {value!r}")
  return int(value)


class EncoderDecoderModel:
  """Loss, `score_batch` and `predict_batch` for an encoder-decoder module, as t5x's class.

  Args:
    module: a flax module with `encode`, `decode` and `__call__` as T5X's `EncoderDecoder`.
    input_vocabulary / output_vocabulary: seqio vocabularies (optional; only kept for callers).
    decode_fn: how `predict_batch` decodes (t5x's `decode_fn`): `decoding.greedy` (the default:
      the paper's decoding; t5x defaults to beam search), `decoding.sample`, `decoding.beam`, or
      any function with their keyword interface.
    z_loss, label_smoothing, loss_normalizing_factor: as T5X's `EncoderDecoderModel` (z_loss
      defaults to 0.0 as there; T5.1.1's gin files set 1e-4).
    eos_id: the end-of-sequence id (T5: 1; t5x reads it from `output_vocabulary`).
  """

  def __init__(self, module: nn.Module, input_vocabulary=None, output_vocabulary=None,
               decode_fn: DecodeFn = decoding.greedy, label_smoothing: float = 0.0,
               z_loss: float = 0.0, loss_normalizing_factor: losses.LossNormalizingFactor = None,
               eos_id: int = 1):
    self.module = module
    self.input_vocabulary = input_vocabulary
    self.output_vocabulary = output_vocabulary
    self.decode_fn = decode_fn
    self.z_loss = z_loss
    self.label_smoothing = label_smoothing
    self.loss_normalizing_factor = loss_normalizing_factor
    self.eos_id = eos_id
    self._with_decode_fns: Dict[Any, "EncoderDecoderModel"] = {}

  @property
  def vocab_size(self) -> Optional[int]:  # None for a module without `config.vocab_size`
    return getattr(getattr(self.module, "config", None), "vocab_size", None)

  def with_decode_fn(self, decode_fn: DecodeFn) -> "EncoderDecoderModel":
    """This model decoding with `decode_fn` (one copy per function, so its compiled prediction
    is reused by every caller that asks for the same function)."""
    if decode_fn is not self.decode_fn and decode_fn not in self._with_decode_fns:
      other = copy.copy(self)
      other.decode_fn, other._with_decode_fns = decode_fn, {}
      self._with_decode_fns[decode_fn] = other
    return self._with_decode_fns.get(decode_fn, self)

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

  def _logits(self, params, batch: Batch, dropout_rng=None):
    batches.check_batch(batch, _REQUIRED_TRAIN_KEYS, self.vocab_size)
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
    weights = _loss_weights(batch)
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
    weights = _loss_weights(batch)
    return losses.sequence_log_likelihood(logits, targets, weights)

  def predict_batch(self, params, batch: Batch, rng: Optional[jnp.ndarray] = None,
                    **kwargs) -> jnp.ndarray:
    """The decoded tokens of `predict_batch_with_aux` (same arguments)."""
    return self.predict_batch_with_aux(params, batch, rng, **kwargs)[0]

  def predict_batch_with_aux(self, params, batch: Batch, rng: Optional[jnp.ndarray] = None,
                             decoder_params: Optional[Mapping[str, Any]] = None,
                             return_all_decodes: bool = False, num_decodes: int = 1,
                             prompt_with_targets: bool = False):
    """(tokens, {'scores': ...}) decoded with `self.decode_fn`: t5x's signature and conventions.

    Tokens [B, L] (the best decode) or, with `return_all_decodes`, [B, num_decodes, L] sorted
    best LAST, scores [B, num_decodes]. `num_decodes`: beams of `decoding.beam`, samples of
    `decoding.sample`. `decoder_params` go to the decode function as keyword arguments (e.g.
    {'alpha': 0.6}, {'temperature': 0.7, 'topk': 40}); `rng` becomes its `decode_rng` (giving
    both is an error, as in t5x). L is the length of `decoder_input_tokens`, whose non-zero
    tokens (EOS removed) are forced as a prompt with `prompt_with_targets` (t5x without prefill).
    On purpose unlike t5x: `decoder_params['max_decode_length']` (ours) sets L and lets a batch
    lack `decoder_input_tokens`; decoder params are Python values compiled into the loop (a new
    value recompiles); the prediction is jitted here.
    """
    decoder_params = dict(decoder_params or {})
    length = decoder_params.pop("max_decode_length", None)
    if length is not None:
      length = _positive_int("decoder_params['max_decode_length']", length)
    needs_targets = length is None or prompt_with_targets
    batches.check_batch(batch, ("encoder_input_tokens",) + ("decoder_input_tokens",) * needs_targets,
                self.vocab_size)
    num_decodes = _positive_int("num_decodes", num_decodes)
    inputs = batch["encoder_input_tokens"]
    prompt = jnp.zeros((inputs.shape[0], length or batch["decoder_input_tokens"].shape[1]),
                       jnp.int32)
    if prompt_with_targets:
      targets = jnp.asarray(batch["decoder_input_tokens"], jnp.int32)
      if targets.shape != prompt.shape:
        raise ValueError(f"decoder_params['max_decode_length']={length} differs from the length "
                         f"{targets.shape[1]} of the prompt 'decoder_input_tokens'")
      prompt = targets * (targets != self.eos_id)
    if rng is not None:
      if decoder_params.get("decode_rng") is not None:
        raise ValueError("got an rng both as `rng` and as decoder_params['decode_rng']; give one")
      decoder_params["decode_rng"] = rng
    rng = decoder_params.pop("decode_rng", None)
    tokens, scores = self._predict_jit(params, inputs, prompt,
                                       jax.random.PRNGKey(0) if rng is None else rng,
                                       num_decodes, tuple(sorted(decoder_params.items())))
    if return_all_decodes:
      return tokens, {"scores": scores}
    return tokens[:, -1], {"scores": scores[:, -1]}

  @functools.partial(jax.jit, static_argnums=(0, 5, 6))
  def _predict_jit(self, params, encoder_input_tokens, prompt, rng, num_decodes, decoder_params):
    rows = encoder_input_tokens.shape[0] * num_decodes
    encoded = self.module.apply({"params": params}, encoder_input_tokens, enable_dropout=False,
                                method=self.module.encode)
    cache = self.init_cache(params, rows, encoder_input_tokens.shape[1], prompt.shape[1])
    if num_decodes > 1:
      encoded, encoder_input_tokens = decoding.expand_to_beams(
          (encoded, encoder_input_tokens), num_decodes)
    cache = self.prefill_cross_attention(params, cache, encoded, encoder_input_tokens)
    return self.decode_fn(
        inputs=prompt, cache=cache,
        tokens_to_logits=self.tokens_to_logits_fn(params, encoded, encoder_input_tokens),
        eos_id=self.eos_id, num_decodes=num_decodes, decode_rng=rng,
        cache_offset=1 if getattr(self.module, "scan_layers", False) else 0,
        **dict(decoder_params))

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
