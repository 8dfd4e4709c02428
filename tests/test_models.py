"""The model wrapper: loss, scoring, t5x's prediction API and the batch check at its boundary."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gqa_t5 import decoding
from gqa_t5.batches import check_batch
from gqa_t5.models import EncoderDecoderModel
from model_fixtures import KV_HEADS, init_params, tiny_batch
from tiny_configs import VARIANTS, tiny_config

LENGTH = 6
VOCAB = VARIANTS["network"]["vocab_size"]


def weights_through_eos(tokens, eos_id=1):
  """1 for every produced token up to and including the first EOS."""
  tokens = np.asarray(tokens)
  ended_before = np.cumsum(tokens == eos_id, axis=-1) - (tokens == eos_id)
  return jnp.asarray((ended_before == 0).astype(np.float32))


def score_of(model, params, inputs, tokens):
  tokens = jnp.asarray(tokens)
  decoder_inputs = jnp.concatenate([jnp.zeros_like(tokens[:, :1]), tokens[:, :-1]], axis=1)
  return np.asarray(model.score_batch(params, {
      "encoder_input_tokens": inputs, "decoder_input_tokens": decoder_inputs,
      "decoder_target_tokens": tokens,
      "decoder_loss_weights": weights_through_eos(tokens, model.eos_id)}))


@pytest.fixture(scope="module", params=KV_HEADS)
def model_and_params(request):
  batch = tiny_batch()
  module, params = init_params(tiny_config("network", request.param), batch)
  return EncoderDecoderModel(module), params, batch


def test_defaults_are_greedy_decoding_and_t5x_z_loss(model_and_params):
  model, params, batch = model_and_params
  assert model.decode_fn is decoding.greedy and model.z_loss == 0.0
  assert float(model.loss_fn(params, batch)[1]["z_loss"]) == 0.0
  # One copy per decode function, so its compiled prediction is reused.
  assert model.with_decode_fn(decoding.greedy) is model
  beam = model.with_decode_fn(decoding.beam)
  assert beam is model.with_decode_fn(decoding.beam) and beam.decode_fn is decoding.beam


def test_greedy_scores_equal_score_batch(model_and_params):
  model, params, batch = model_and_params
  tokens, aux = model.predict_batch_with_aux(params, batch)
  assert tokens.shape == (3, LENGTH) and aux["scores"].shape == (3,)
  np.testing.assert_allclose(aux["scores"],
                             score_of(model, params, batch["encoder_input_tokens"], tokens),
                             atol=1e-4)
  # decoder_params['max_decode_length'] decodes a batch without decoder_input_tokens.
  short = model.predict_batch(params, {"encoder_input_tokens": batch["encoder_input_tokens"]},
                              decoder_params={"max_decode_length": 4})
  np.testing.assert_array_equal(np.asarray(short), np.asarray(tokens)[:, :4])


def test_beam_search_with_one_beam_is_greedy_when_nothing_ends(model_and_params):
  # eos_id -1: no beam finishes, so t5x returns the live beam, the argmax path, scored raw.
  model, params, batch = model_and_params
  never_ends = EncoderDecoderModel(model.module, eos_id=-1)
  greedy, greedy_aux = never_ends.predict_batch_with_aux(params, batch)
  beam, beam_aux = never_ends.with_decode_fn(decoding.beam).predict_batch_with_aux(
      params, batch, num_decodes=1, decoder_params={"alpha": 0.6})
  np.testing.assert_array_equal(np.asarray(beam), np.asarray(greedy))
  np.testing.assert_allclose(beam_aux["scores"], greedy_aux["scores"], atol=1e-5)


@pytest.mark.parametrize("alpha", [0.0, 0.6])
def test_beams_best_last_only_finished_and_scored_as_score_batch(model_and_params, alpha):
  model, params, batch = model_and_params
  inputs = batch["encoder_input_tokens"]
  # EOS = the token greedy decoding produces most, so that some beams finish and some do not.
  free = np.asarray(EncoderDecoderModel(model.module, eos_id=-1).predict_batch(params, batch))
  eos = int(np.bincount(free.ravel()).argmax())
  beam_model = EncoderDecoderModel(model.module, decode_fn=decoding.beam, eos_id=eos)
  beams, aux = beam_model.predict_batch_with_aux(params, batch, num_decodes=4,
                                                 return_all_decodes=True,
                                                 decoder_params={"alpha": alpha})
  beams, scores = np.asarray(beams), np.asarray(aux["scores"])
  assert beams.shape == (3, 4, LENGTH) and scores.shape == (3, 4)
  assert np.all(np.diff(scores, axis=1) >= 0)  # best last, as t5x
  finished = (beams == eos).any(-1)
  assert finished.any()
  for b in range(3):
    likelihood = score_of(beam_model, params, jnp.repeat(inputs[b:b + 1], 4, axis=0), beams[b])
    if not finished[b].any():  # t5x: the live beams, raw log-likelihood
      np.testing.assert_allclose(scores[b], likelihood, atol=1e-4)
      continue
    for w in range(4):
      if finished[b, w]:
        length = np.flatnonzero(beams[b, w] == eos)[0] + 1
        np.testing.assert_allclose(scores[b, w] * ((5.0 + length) / 6.0) ** alpha,
                                   likelihood[w], atol=1e-4)
      else:  # t5x keeps only finished beams; empty slots score NEG_INF
        assert scores[b, w] == decoding.NEG_INF and not beams[b, w].any()
  best, best_aux = beam_model.predict_batch_with_aux(params, batch, num_decodes=4,
                                                     decoder_params={"alpha": alpha})
  np.testing.assert_array_equal(np.asarray(best), beams[:, -1])
  np.testing.assert_array_equal(np.asarray(best_aux["scores"]), scores[:, -1])


def test_num_decodes_shapes_for_every_decode_fn(model_and_params):
  model, params, batch = model_and_params
  for fn in (decoding.greedy, decoding.sample, decoding.beam):
    tokens, aux = model.with_decode_fn(fn).predict_batch_with_aux(
        params, batch, jax.random.PRNGKey(0), num_decodes=3, return_all_decodes=True)
    assert tokens.shape == (3, 3, LENGTH) and aux["scores"].shape == (3, 3), fn.__name__
    assert np.all(np.diff(np.asarray(aux["scores"]), axis=1) >= 0), fn.__name__


def test_decoder_params_and_rng_reach_the_decode_fn(model_and_params):
  model, params, batch = model_and_params
  seen = {}

  def spy(**kwargs):
    seen.update(kwargs)
    return decoding.sample(**kwargs)

  spying = EncoderDecoderModel(model.module, decode_fn=spy)
  rng = jax.random.PRNGKey(7)
  by_rng = spying.predict_batch(params, batch, rng, decoder_params={"temperature": 2.0, "topk": 5},
                                num_decodes=2)
  assert (seen["temperature"], seen["topk"], seen["num_decodes"], seen["eos_id"]) == (2.0, 5, 2, 1)
  assert seen["inputs"].shape == (3, LENGTH)
  by_params = spying.predict_batch(params, batch, decoder_params={
      "temperature": 2.0, "topk": 5, "decode_rng": rng}, num_decodes=2)
  np.testing.assert_array_equal(np.asarray(by_rng), np.asarray(by_params))
  with pytest.raises(ValueError, match="decode_rng"):
    spying.predict_batch(params, batch, rng, decoder_params={"decode_rng": rng})
  with pytest.raises(TypeError, match="bogus"):
    model.predict_batch(params, batch, decoder_params={"bogus": 1})


def test_prompt_with_targets_forces_the_targets(model_and_params):
  model, params, batch = model_and_params
  tokens = np.asarray(model.predict_batch(params, batch, prompt_with_targets=True))
  prompt = np.asarray(batch["decoder_input_tokens"])
  forced = np.pad(prompt[:, 1:], ((0, 0), (0, 1)))
  np.testing.assert_array_equal(tokens[forced > 0], forced[forced > 0])


def test_loss_fn_reports_accuracy(model_and_params):
  model, params, batch = model_and_params
  loss, metrics = model.loss_fn(params, batch)
  assert np.isfinite(float(loss)) and float(loss) > 0
  assert float(metrics["weight_sum"]) == float((batch["decoder_target_tokens"] > 0).sum())
  z = EncoderDecoderModel(model.module, z_loss=1e-4).loss_fn(params, batch)[1]["z_loss"]
  assert float(z) > 0


# ---- the batch checks (one K: the checks run before the network) ------------------------------


@pytest.fixture(scope="module")
def gqa_model():
  batch = tiny_batch()
  module, params = init_params(tiny_config("network", 2), batch)
  return EncoderDecoderModel(module), params, batch


def _with(batch, **changes):
  out = dict(batch)
  out.update(changes)
  return out


def _bad_batches(batch):
  enc, dec, tgt = (np.asarray(batch[k]) for k in
                   ("encoder_input_tokens", "decoder_input_tokens", "decoder_target_tokens"))
  too_high, negative = tgt.copy(), enc.copy()
  too_high[0, 0], negative[1, 2] = VOCAB, -1
  return {  # name: (changes, error type, words the message must hold)
      "float ids": (dict(encoder_input_tokens=enc.astype(np.float32) + 0.5), TypeError,
                    ["'encoder_input_tokens'", "integer", "float32"]),
      "float targets": (dict(decoder_target_tokens=jnp.asarray(tgt, jnp.float32)), TypeError,
                        ["'decoder_target_tokens'", "float32"]),
      "id too high": (dict(decoder_target_tokens=too_high), ValueError,
                      ["'decoder_target_tokens'", f"[0, {VOCAB})", f"max {VOCAB}"]),
      "negative id": (dict(encoder_input_tokens=jnp.asarray(negative)), ValueError,
                      ["'encoder_input_tokens'", "min -1"]),
      "batch mismatch": (dict(encoder_input_tokens=enc[:2], decoder_input_tokens=dec[:1],
                              decoder_target_tokens=tgt[:1]), ValueError,
                         ["'decoder_target_tokens'", "batch size 1", "expected 2"]),
      "rank 3": (dict(encoder_input_tokens=enc[:, :, None]), ValueError,
                 ["'encoder_input_tokens'", "rank 2", "rank 3"]),
      "rank 1": (dict(decoder_input_tokens=dec[0]), ValueError,
                 ["'decoder_input_tokens'", "rank 2", "rank 1"]),
      "empty": (dict(encoder_input_tokens=enc[:, :0]), ValueError,
                ["'encoder_input_tokens'", "empty", "(3, 0)"]),
      "decoder lengths": (dict(decoder_input_tokens=dec[:, :4]), ValueError,
                          ["'decoder_input_tokens'", "length 4", "expected 6"]),
      "weights shape": (dict(decoder_loss_weights=np.ones((3, 5), np.float32)), ValueError,
                        ["'decoder_loss_weights'", "length 5", "expected 6"]),
      "bool weights": (dict(decoder_loss_weights=np.ones((3, 6), bool)), TypeError,
                       ["'decoder_loss_weights'", "bool"]),
  }


_ENTRY_POINTS = {
    "loss_fn": lambda model, params, batch: model.loss_fn(params, batch),
    "score_batch": lambda model, params, batch: model.score_batch(params, batch),
    "predict_batch_with_aux": lambda model, params, batch: model.predict_batch_with_aux(
        params, batch),
}
# Features prediction does not read (targets, weights) or cases that only concern them.
_PREDICT_IGNORES = ("float targets", "id too high", "weights shape", "bool weights",
                    "decoder lengths")
_CASES = [(entry, case) for entry in sorted(_ENTRY_POINTS) for case in sorted(_bad_batches(
    tiny_batch())) if not (entry == "predict_batch_with_aux" and case in _PREDICT_IGNORES)]


@pytest.mark.parametrize("entry,case", _CASES)
def test_malformed_batches_are_refused_with_named_errors(gqa_model, entry, case):
  model, params, batch = gqa_model
  changes, error, words = _bad_batches(batch)[case]
  bad = _with(batch, **changes)
  if entry == "predict_batch_with_aux":
    bad.pop("decoder_target_tokens")
    bad.pop("decoder_loss_weights", None)
    if case == "batch mismatch":
      words = ["'decoder_input_tokens'", "batch size 1", "expected 2"]
  with pytest.raises(error) as caught:
    _ENTRY_POINTS[entry](model, params, bad)
  for word in words:
    assert word in str(caught.value), (word, str(caught.value))


def test_missing_features_and_bad_prediction_settings_are_named(gqa_model):
  model, params, batch = gqa_model
  with pytest.raises(KeyError, match="decoder_target_tokens"):
    model.loss_fn(params, _with({}, encoder_input_tokens=batch["encoder_input_tokens"],
                                decoder_input_tokens=batch["decoder_input_tokens"]))
  with pytest.raises(KeyError, match="decoder_input_tokens"):
    model.predict_batch(params, {"encoder_input_tokens": batch["encoder_input_tokens"]})
  for value in (0, -2, 1.5):
    with pytest.raises(ValueError, match=f"num_decodes must be a positive integer, got {value}"):
      model.predict_batch(params, batch, num_decodes=value)
  with pytest.raises(ValueError, match=r"decoder_params\['max_decode_length'\] must be a "
                                       r"positive integer, got 0"):
    model.predict_batch(params, batch, decoder_params={"max_decode_length": 0})


def test_range_check_is_skipped_under_tracing_but_dtype_and_shape_are_not(gqa_model):
  model, params, batch = gqa_model
  jitted = jax.jit(model.loss_fn)
  assert np.isfinite(float(jitted(params, batch)[0]))
  with pytest.raises(TypeError, match="'encoder_input_tokens'"):
    jitted(params, _with(batch, encoder_input_tokens=batch["encoder_input_tokens"] * 1.0))
  seen = []
  jax.jit(lambda b: seen.append(check_batch(b, ("encoder_input_tokens",), 2)) or 0)(batch)
  assert seen == [None]  # ids up to 66 with vocab_size 2 pass: no values while tracing
  with pytest.raises(ValueError, match="outside"):
    check_batch(batch, ("encoder_input_tokens",), 2)
