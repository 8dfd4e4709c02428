"""T5X's prompt prefill (`decode(..., prefill=True)`) against step-by-step decoding."""

import jax.numpy as jnp
import numpy as np
import pytest

from gqa_t5 import decoding
from gqa_t5.model import Transformer
from gqa_t5.model.scanning import stack_layers
from gqa_t5.models import EncoderDecoderModel
from model_fixtures import KV_HEADS, forward, init_params, tiny_batch
from tiny_configs import tiny_config
from test_network import decode_step_by_step


def prefill(module, params, batch, prompt, prefill_lengths=None):
  """T5X's prompt prefill: the cache after one `decode(..., prefill=True)` call."""
  enc = batch["encoder_input_tokens"]
  _, cache = module.apply({"params": params}, enc, jnp.ones_like(prompt), jnp.ones_like(prompt),
                          decode=True, enable_dropout=False, mutable=["cache"])
  encoded = module.apply({"params": params}, enc, enable_dropout=False, method=module.encode)
  logits, variables = module.apply(
      {"params": params, "cache": cache["cache"]}, encoded, enc, prompt, jnp.ones_like(prompt),
      enable_dropout=False, prefill=True, prefill_lengths=prefill_lengths, mutable=["cache"],
      method=module.decode)
  return logits, variables["cache"], encoded


@pytest.mark.parametrize("num_kv_heads", KV_HEADS)
def test_prefill_equals_step_by_step_decoding(num_kv_heads):
  """Per-example prompt lengths: the prefilled cache is the cache after feeding each prompt
  step by step, and the next step's logits match."""
  batch = tiny_batch()
  module, params = init_params(tiny_config("network", num_kv_heads), batch)
  enc, dec_in = batch["encoder_input_tokens"], batch["decoder_input_tokens"]
  lengths = np.array([2, 4, 3])
  # T5X's prompt: BOS then the prompt tokens; its non-zero count is the prefill length.
  prompt = jnp.where(jnp.arange(6)[None] <= lengths[:, None], dec_in, 0)
  _, cache, encoded = prefill(module, params, batch, prompt)

  stepped, _ = decode_step_by_step(module, params, batch)
  caches = []
  for steps in range(1, 5):  # the cache after feeding `steps` tokens one at a time
    truncated = dict(batch, decoder_input_tokens=dec_in[:, :steps])
    caches.append(decode_step_by_step_cache(module, params, truncated, dec_in.shape[1]))
  for layer in ("layers_0", "layers_1"):
    ours = cache["decoder"][layer]["self_attention"]
    np.testing.assert_array_equal(np.asarray(ours["cache_index"]), lengths)
    for b, length in enumerate(lengths):
      reference = caches[length - 1]["decoder"][layer]["self_attention"]
      for name in ("cached_key", "cached_value"):
        np.testing.assert_allclose(np.asarray(ours[name][b]), np.asarray(reference[name][b]),
                                   atol=1e-5)
    cross = cache["decoder"][layer]["encoder_decoder_attention"]
    assert bool(jnp.all(cross["kv_filled"]))
    np.testing.assert_allclose(
        np.asarray(cross["cached_key"]),
        np.asarray(caches[0]["decoder"][layer]["encoder_decoder_attention"]["cached_key"]),
        atol=1e-5)

  next_tokens = jnp.take_along_axis(dec_in, jnp.asarray(lengths)[:, None], axis=1)  # [B, 1]
  logits, _ = module.apply({"params": params, "cache": cache}, encoded, enc, next_tokens,
                           jnp.ones_like(next_tokens), decode=True, enable_dropout=False,
                           mutable=["cache"], method=module.decode)
  for b, length in enumerate(lengths):
    np.testing.assert_allclose(np.asarray(logits[b, 0]), np.asarray(stepped[b, length]),
                               atol=2e-5)


def decode_step_by_step_cache(module, params, batch, cache_length):
  """The cache after feeding `decoder_input_tokens` one step at a time into a cache of
  `cache_length` positions."""
  enc = batch["encoder_input_tokens"]
  dec_in = batch["decoder_input_tokens"]
  full = jnp.ones((dec_in.shape[0], cache_length), jnp.int32)
  _, cache = module.apply({"params": params}, enc, full, full, decode=True,
                          enable_dropout=False, mutable=["cache"])
  cache = cache["cache"]
  encoded = module.apply({"params": params}, enc, enable_dropout=False, method=module.encode)
  for t in range(dec_in.shape[1]):
    tokens = dec_in[:, t:t + 1]
    _, updated = module.apply({"params": params, "cache": cache}, encoded, enc, tokens,
                              jnp.ones_like(tokens), decode=True, enable_dropout=False,
                              mutable=["cache"], method=module.decode)
    cache = updated["cache"]
  return cache


def test_prefill_logits_equal_teacher_forcing_and_flags_are_checked():
  batch = tiny_batch()
  module, params = init_params(tiny_config("network", 2), batch)
  dec_in = batch["decoder_input_tokens"]
  logits, cache, encoded = prefill(module, params, batch, dec_in,
                                   prefill_lengths=jnp.full((3,), 6))
  teacher_forced = forward(module, params, dict(batch, decoder_target_tokens=jnp.ones_like(
      dec_in)))
  np.testing.assert_allclose(np.asarray(logits), np.asarray(teacher_forced), atol=2e-5)
  with pytest.raises(ValueError, match="decode and prefill cannot both be True"):
    module.apply({"params": params, "cache": cache}, encoded, batch["encoder_input_tokens"],
                 dec_in, dec_in, enable_dropout=False, decode=True, prefill=True,
                 mutable=["cache"], method=module.decode)


@pytest.mark.parametrize("scan_layers", [False, True])
def test_greedy_continuation_after_prefill_equals_step_by_step(scan_layers):
  """Our loop from a prefilled cache (`decoding.prefill_inputs`, per-example prompt lengths)
  produces what it produces after the prompt was fed one token at a time."""
  batch = tiny_batch()
  module, params = init_params(tiny_config("network", 2), batch)
  if scan_layers:
    module, params = Transformer(module.config.replace(scan_layers=True)), stack_layers(params)
  model = EncoderDecoderModel(module)
  enc, dec_in = batch["encoder_input_tokens"], batch["decoder_input_tokens"]
  lengths = np.array([1, 3, 2])
  prompt = jnp.where(jnp.arange(6)[None] <= lengths[:, None], dec_in, 0)[:, :4]
  prefill_lengths, initial_tokens = decoding.prefill_inputs(prompt)
  np.testing.assert_array_equal(np.asarray(prefill_lengths), lengths)
  cache = model.init_cache(params, 3, enc.shape[1], 8)
  encoded = module.apply({"params": params}, enc, enable_dropout=False, method=module.encode)
  _, variables = module.apply({"params": params, "cache": cache}, encoded, enc, prompt,
                              jnp.ones_like(prompt), enable_dropout=False, prefill=True,
                              prefill_lengths=prefill_lengths, mutable=["cache"],
                              method=module.decode)
  step = model.tokens_to_logits_fn(params, encoded, enc)
  ours, _ = decoding.temperature_sample(variables["cache"], step, 3, 5,
                                        initial_tokens=initial_tokens)
  for b, length in enumerate(lengths):  # one example at a time: its prompt, step by step
    row = lambda x: x[b:b + 1]
    cache = model.prefill_cross_attention(params, model.init_cache(params, 1, enc.shape[1], 8),
                                          row(encoded), row(enc))
    row_step = model.tokens_to_logits_fn(params, row(encoded), row(enc))
    for t in range(length):
      _, cache = row_step(prompt[b:b + 1, t:t + 1], cache)
    reference, _ = decoding.temperature_sample(cache, row_step, 1, 5,
                                               initial_tokens=row(initial_tokens))
    np.testing.assert_array_equal(np.asarray(ours[b]), np.asarray(reference[0]))
