"""scan_layers=True: T5X's scanned parameter and cache layouts, decoding equal to unrolled."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gqa_t5 import decoding
from gqa_t5.model import Transformer
from gqa_t5.model.scanning import stack_layers, unstack_layers
from gqa_t5.models import EncoderDecoderModel
from model_fixtures import KV_HEADS, init_params, tiny_batch
from tiny_configs import tiny_config

LENGTH = 6


@pytest.fixture(scope="module", params=KV_HEADS)
def unrolled_and_scanned(request):
  batch = tiny_batch()
  module, params = init_params(tiny_config("network", request.param), batch)
  scanned = Transformer(module.config.replace(scan_layers=True))
  return (EncoderDecoderModel(module), params, EncoderDecoderModel(scanned),
          stack_layers(params), batch)


@pytest.mark.parametrize("decode_fn", [decoding.greedy, decoding.beam], ids=["greedy", "beam"])
def test_scanned_decodes_equal_unrolled(unrolled_and_scanned, decode_fn):
  # Beam search reorders cache rows: with scan_layers they sit on axis 1 ([L, B*W, ...]).
  model, params, scanned_model, scanned_params, batch = unrolled_and_scanned
  request = {"encoder_input_tokens": batch["encoder_input_tokens"]}
  kwargs = dict(decoder_params={"max_decode_length": LENGTH}, return_all_decodes=True,
                num_decodes=1 if decode_fn is decoding.greedy else 3)
  tokens, aux = model.with_decode_fn(decode_fn).predict_batch_with_aux(params, request, **kwargs)
  scanned_tokens, scanned_aux = scanned_model.with_decode_fn(decode_fn).predict_batch_with_aux(
      scanned_params, request, **kwargs)
  np.testing.assert_array_equal(np.asarray(scanned_tokens), np.asarray(tokens))
  np.testing.assert_allclose(np.asarray(scanned_aux["scores"]), np.asarray(aux["scores"]),
                             atol=1e-5)


def test_scanned_cache_has_t5x_layout(unrolled_and_scanned):
  """Layer axis first on every cache leaf (t5x's loops then use cache_offset = 1)."""
  model, params, scanned_model, scanned_params, batch = unrolled_and_scanned
  k = model.module.config.self_attention_kv_heads
  cache = scanned_model.init_cache(scanned_params, 3, 9, LENGTH)
  layers = cache["decoder"]["layers"]
  assert layers["self_attention"]["cached_key"].shape == (2, 3, k, LENGTH, 8)  # [L, B, K, S, H]
  assert layers["self_attention"]["cache_index"].shape == (2,)
  assert layers["encoder_decoder_attention"]["cached_value"].shape == (2, 3, k, 9, 8)
  assert layers["encoder_decoder_attention"]["kv_filled"].shape == (2, 3)
  assert scanned_model.module.scan_layers and not model.module.scan_layers


def test_scanned_steps_equal_unrolled_steps_with_t5x_first_step_fill(unrolled_and_scanned):
  """t5x's loops (no prefill_cross_attention, no cross_kv_cached): the lax.cond path."""
  model, params, scanned_model, scanned_params, batch = unrolled_and_scanned
  enc = batch["encoder_input_tokens"]
  dec_in = batch["decoder_input_tokens"]

  def run(m, p):
    module = m.module
    cache = m.init_cache(p, 3, enc.shape[1], dec_in.shape[1])
    encoded = module.apply({"params": p}, enc, enable_dropout=False, method=module.encode)
    step = jax.jit(lambda c, t: module.apply({"params": p, "cache": c}, encoded, enc, t,
                                             jnp.ones_like(t), decode=True,
                                             enable_dropout=False, mutable=["cache"],
                                             method=module.decode))
    logits = []
    for t in range(dec_in.shape[1]):
      out, variables = step(cache, dec_in[:, t:t + 1])
      cache = variables["cache"]
      logits.append(out)
    return jnp.concatenate(logits, axis=1), cache

  ours, cache = run(model, params)
  scanned, scanned_cache = run(scanned_model, scanned_params)
  np.testing.assert_allclose(np.asarray(scanned), np.asarray(ours), atol=1e-5)
  stacked = scanned_cache["decoder"]["layers"]["self_attention"]["cached_key"]
  np.testing.assert_allclose(np.asarray(stacked[1]),
                             np.asarray(cache["decoder"]["layers_1"]["self_attention"]
                                        ["cached_key"]), atol=1e-6)


def test_stack_and_unstack_round_trip():
  batch = tiny_batch()
  _, params = init_params(tiny_config("network", 2), batch)
  stacked = stack_layers(params)
  assert stacked["decoder"]["layers"]["self_attention"]["key"]["kernel"].shape == (24, 2, 16)
  round_trip = unstack_layers(stacked)
  assert jax.tree.structure(round_trip) == jax.tree.structure(params)
  for a, b in zip(jax.tree.leaves(round_trip), jax.tree.leaves(params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
