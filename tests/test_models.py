"""The model wrapper: losses, scoring, and greedy / sampled / beam decoding."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gqa_t5 import losses
from gqa_t5.models import EncoderDecoderModel
from model_fixtures import KV_HEADS, init_params, tiny_batch, tiny_config

LENGTH = 6


def weights_through_eos(tokens, eos_id=1):
  """1 for every produced token up to and including the first EOS."""
  tokens = np.asarray(tokens)
  ended_before = np.cumsum(tokens == eos_id, axis=-1) - (tokens == eos_id)
  return jnp.asarray((ended_before == 0).astype(np.float32))


def score_of(model, params, inputs, tokens):
  decoder_inputs = jnp.concatenate([jnp.zeros_like(tokens[:, :1]), tokens[:, :-1]], axis=1)
  return model.score_batch(params, {
      "encoder_input_tokens": inputs, "decoder_input_tokens": decoder_inputs,
      "decoder_target_tokens": tokens, "decoder_loss_weights": weights_through_eos(tokens)})


@pytest.fixture(scope="module", params=KV_HEADS)
def model_and_params(request):
  batch = tiny_batch()
  module, params = init_params(tiny_config(request.param), batch)
  return EncoderDecoderModel(module), params, batch


def test_greedy_scores_equal_score_batch(model_and_params):
  model, params, batch = model_and_params
  inputs = batch["encoder_input_tokens"]
  tokens, aux = model.predict_batch_with_aux(params, {"encoder_input_tokens": inputs},
                                             max_decode_length=LENGTH)
  assert tokens.shape == (3, LENGTH)
  np.testing.assert_allclose(aux["scores"], score_of(model, params, inputs, tokens), atol=1e-4)


def test_beam_search_with_one_beam_is_greedy(model_and_params):
  model, params, batch = model_and_params
  request = {"encoder_input_tokens": batch["encoder_input_tokens"]}
  greedy = model.predict_batch(params, request, max_decode_length=LENGTH)
  beam, aux = model.predict_batch_with_aux(params, request, method="beam", num_decodes=1,
                                           alpha=0.0, max_decode_length=LENGTH)
  np.testing.assert_array_equal(np.asarray(beam), np.asarray(greedy))


def test_beam_scores_equal_score_batch_and_beat_greedy(model_and_params):
  model, params, batch = model_and_params
  inputs = batch["encoder_input_tokens"]
  beams, aux = model.predict_batch_with_aux(
      params, {"encoder_input_tokens": inputs}, method="beam", num_decodes=3, alpha=0.0,
      max_decode_length=LENGTH, return_all_decodes=True)
  assert beams.shape == (3, 3, LENGTH)
  for w in range(3):
    np.testing.assert_allclose(aux["scores"][:, w], score_of(model, params, inputs, beams[:, w]),
                               atol=1e-4)
  assert np.all(np.diff(np.asarray(aux["scores"]), axis=1) <= 1e-6)  # best first
  greedy_scores = model.predict_batch_with_aux(params, {"encoder_input_tokens": inputs},
                                               max_decode_length=LENGTH)[1]["scores"]
  assert np.all(np.asarray(aux["scores"][:, 0]) >= np.asarray(greedy_scores) - 1e-5)


def test_top1_sampling_is_greedy_and_sampling_varies_with_rng(model_and_params):
  model, params, batch = model_and_params
  request = {"encoder_input_tokens": batch["encoder_input_tokens"]}
  greedy = model.predict_batch(params, request, max_decode_length=LENGTH)
  top1 = model.predict_batch(params, request, jax.random.PRNGKey(3), method="sample", topk=1,
                             max_decode_length=LENGTH)
  np.testing.assert_array_equal(np.asarray(top1), np.asarray(greedy))
  samples = {tuple(np.asarray(model.predict_batch(params, request, jax.random.PRNGKey(s),
                                                  method="sample", temperature=5.0,
                                                  max_decode_length=LENGTH)).ravel())
             for s in range(4)}
  assert len(samples) > 1


def test_decoding_stops_at_eos_and_pads_after_it():
  batch = tiny_batch()
  config = tiny_config(2)
  module, params = init_params(config, batch)
  # Make EOS (id 1) overwhelmingly likely after the first token by biasing the logits kernel.
  params = jax.tree.map(lambda x: x, params)
  kernel = params["decoder"]["logits_dense"]["kernel"]
  params["decoder"]["logits_dense"]["kernel"] = kernel.at[:, 1].set(0.0)
  model = EncoderDecoderModel(module)
  tokens = np.asarray(model.predict_batch(params, {"encoder_input_tokens":
                                                   batch["encoder_input_tokens"]},
                                          max_decode_length=LENGTH))
  for row in tokens:
    eos = np.flatnonzero(row == 1)
    if eos.size:
      assert np.all(row[eos[0] + 1:] == 0)


def test_loss_matches_one_hot_reference_with_smoothing_and_z_loss():
  rng = np.random.RandomState(0)
  logits = rng.randn(2, 5, 11).astype(np.float32)
  targets = rng.randint(0, 11, (2, 5))
  weights = (rng.rand(2, 5) > 0.3).astype(np.float32)
  smoothing, z = 0.1, 1e-4
  confidence, low = 1 - smoothing, smoothing / 10
  soft = np.full((2, 5, 11), low)
  np.put_along_axis(soft, targets[..., None], confidence, axis=-1)
  log_z = np.log(np.exp(logits).sum(-1))
  log_p = logits - log_z[..., None]
  constant = -(confidence * np.log(confidence) + 10 * low * np.log(low))
  per_token = -(soft * log_p).sum(-1) - constant + z * log_z ** 2
  loss, z_loss, weight_sum = losses.weighted_cross_entropy(
      jnp.asarray(logits), jnp.asarray(targets), jnp.asarray(weights), smoothing, z)
  np.testing.assert_allclose(loss, (per_token * weights).sum(), rtol=1e-5)
  np.testing.assert_allclose(z_loss, (z * log_z ** 2 * weights).sum(), rtol=1e-5)
  assert float(weight_sum) == weights.sum()
  normalised = losses.weighted_cross_entropy(jnp.asarray(logits), jnp.asarray(targets),
                                             jnp.asarray(weights), smoothing, z,
                                             losses.NUM_REAL_TARGET_TOKENS)[0]
  np.testing.assert_allclose(normalised, (per_token * weights).sum() / weights.sum(), rtol=1e-5)
  with pytest.raises(ValueError, match="unknown loss_normalizing_factor 'BOGUS'"):
    losses.weighted_cross_entropy(jnp.asarray(logits), jnp.asarray(targets), None, 0.0, 0.0,
                                  "BOGUS")


def test_loss_fn_reports_accuracy_and_requires_features(model_and_params):
  model, params, batch = model_and_params
  loss, metrics = model.loss_fn(params, batch)
  assert np.isfinite(float(loss)) and float(loss) > 0
  assert float(metrics["weight_sum"]) == float((batch["decoder_target_tokens"] > 0).sum())
  with pytest.raises(KeyError, match="decoder_target_tokens"):
    model.loss_fn(params, {"encoder_input_tokens": batch["encoder_input_tokens"],
                           "decoder_input_tokens": batch["decoder_input_tokens"]})
  with pytest.raises(ValueError, match="unknown decoding method 'nucleus'"):
    model.predict_batch(params, {"encoder_input_tokens": batch["encoder_input_tokens"]},
                        method="nucleus", max_decode_length=LENGTH)
