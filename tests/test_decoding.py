"""Decoding loops and decode functions, on a Markov table (exact references) and a tiny model."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gqa_t5 import decoding
from gqa_t5.models import EncoderDecoderModel
from model_fixtures import init_params, tiny_batch
from tiny_configs import tiny_config

EOS = 1


def markov(table, rows_per_example):
  """A decoder whose logits depend on (example, step, previous token): table [B, L, V, V]."""
  b = table.shape[0]
  cache = {"step": jnp.zeros((), jnp.int32),
           "example": jnp.repeat(jnp.arange(b), rows_per_example)}

  def tokens_to_logits(tokens, cache):
    logits = jnp.asarray(table)[cache["example"], cache["step"], tokens[:, 0]]
    return logits, {"step": cache["step"] + 1, "example": cache["example"]}
  return cache, tokens_to_logits


def log_likelihood(table, example, seq, start=0):
  """Sum of log p of seq's tokens from position `start` up to and including the first EOS."""
  log_p = np.asarray(jax.nn.log_softmax(jnp.asarray(table, jnp.float32)))
  prev, total = 0, 0.0
  for t, token in enumerate(seq):
    if t >= start:
      total += log_p[example, t, prev, token]
    if token == EOS:
      break
    prev = token
  return total


def random_table(batch, length, vocab, seed=0):
  return np.random.RandomState(seed).randn(batch, length, vocab, vocab).astype(np.float32) * 2


def run_beam(table, beams, alpha, inputs=None):
  b, length = table.shape[:2]
  cache, fn = markov(table, beams)
  inputs = jnp.zeros((b, length), jnp.int32) if inputs is None else inputs
  return decoding.beam(inputs=inputs, cache=cache, tokens_to_logits=fn, eos_id=EOS,
                       num_decodes=beams, alpha=alpha)


@pytest.mark.parametrize("alpha", [0.0, 0.6])
def test_exhaustive_beam_returns_every_finished_sequence_best_last(alpha):
  # V=3, L=3, W=8: every prefix stays live, so the finished set is known by enumeration: EOS
  # after 0, 1 or 2 tokens from {0, 2} (7 sequences); the 8th slot is a filler.
  table = random_table(2, 3, 3)
  seqs, scores = run_beam(table, beams=8, alpha=alpha)
  for example in range(2):
    expected = []
    for n in range(3):
      for prefix in itertools.product((0, 2), repeat=n):
        seq = list(prefix) + [EOS] + [0] * (2 - n)
        score = log_likelihood(table, example, seq) / ((5.0 + n + 1) / 6.0) ** alpha
        expected.append((score, seq))
    expected.sort()
    np.testing.assert_array_equal(np.asarray(seqs[example, 0]), [0, 0, 0])  # filler first
    assert float(scores[example, 0]) == decoding.NEG_INF
    np.testing.assert_array_equal(np.asarray(seqs[example, 1:]), [s for _, s in expected])
    np.testing.assert_allclose(np.asarray(scores[example, 1:]), [s for s, _ in expected],
                               rtol=1e-5)


def test_beam_without_finished_beam_returns_live_beams_with_raw_log_likelihood():
  table = random_table(2, 4, 5)
  table[..., EOS] = -40.0  # EOS never enters the top 2W candidates
  seqs, scores = run_beam(table, beams=2, alpha=0.6)
  seqs, scores = np.asarray(seqs), np.asarray(scores)
  assert not (seqs == EOS).any()
  assert np.all(np.diff(scores, axis=1) >= 0)  # best last
  for example in range(2):
    for w in range(2):  # t5x: raw log-likelihood, no length penalty, for live beams
      np.testing.assert_allclose(scores[example, w],
                                 log_likelihood(table, example, seqs[example, w]), rtol=1e-5)


def test_one_beam_is_greedy_when_no_eos_competes_before_greedy_ends():
  table = random_table(2, 4, 5, seed=3)
  table[..., EOS] = -40.0
  table[:, 2, :, EOS] = 40.0  # greedy ends at position 2; EOS is never a runner-up before
  cache, fn = markov(table, 1)
  inputs = jnp.zeros((2, 4), jnp.int32)
  greedy, greedy_scores = decoding.greedy(inputs=inputs, cache=cache, tokens_to_logits=fn,
                                          eos_id=EOS)
  beam, beam_scores = run_beam(table, beams=1, alpha=0.0)
  assert greedy.shape == beam.shape == (2, 1, 4)
  np.testing.assert_array_equal(np.asarray(beam), np.asarray(greedy))
  assert np.all(np.asarray(greedy)[:, 0, 2] == EOS)
  np.testing.assert_allclose(beam_scores, greedy_scores, rtol=1e-6)


def test_prompt_is_forced_and_adds_nothing_to_the_scores():
  table = random_table(1, 5, 6, seed=4)
  table[..., EOS] = -40.0
  table[:, 4, :, EOS] = 40.0  # every beam ends at the last position
  inputs = jnp.array([[0, 4, 3, 0, 0]], jnp.int32)  # t5x: decoder inputs, shifted right
  cache, fn = markov(table, 1)
  tokens, scores = decoding.greedy(inputs=inputs, cache=cache, tokens_to_logits=fn, eos_id=EOS)
  tokens = np.asarray(tokens)[0, 0]
  assert list(tokens[:2]) == [4, 3] and tokens[4] == EOS
  np.testing.assert_allclose(scores[0, 0], log_likelihood(table, 0, tokens, start=2), rtol=1e-5)
  beams, beam_scores = run_beam(table, beams=3, alpha=0.0, inputs=inputs)
  assert np.all(np.asarray(beams)[0, :, :2] == [4, 3])
  for w in range(3):
    np.testing.assert_allclose(beam_scores[0, w],
                               log_likelihood(table, 0, np.asarray(beams)[0, w], start=2),
                               rtol=1e-5)


def test_samples_are_sorted_best_last_and_scored_by_log_likelihood():
  table = random_table(2, 4, 6, seed=5)
  cache, fn = markov(table, 5)
  seqs, scores = decoding.sample(inputs=jnp.zeros((2, 4), jnp.int32), cache=cache,
                                 tokens_to_logits=fn, eos_id=EOS, num_decodes=5,
                                 decode_rng=jax.random.PRNGKey(1), temperature=1.0)
  seqs, scores = np.asarray(seqs), np.asarray(scores)
  assert seqs.shape == (2, 5, 4) and np.all(np.diff(scores, axis=1) >= 0)
  for example in range(2):
    for n in range(5):
      np.testing.assert_allclose(scores[example, n],
                                 log_likelihood(table, example, seqs[example, n]), rtol=1e-5)
  assert len({tuple(s) for s in seqs.reshape(-1, 4)}) > 2  # samples differ


def test_invalid_sampling_settings_name_the_setting():
  cache, fn = markov(random_table(1, 2, 3), 1)
  with pytest.raises(ValueError, match="temperature must be >= 0, got -1"):
    decoding.temperature_sample(cache, fn, 1, 2, temperature=-1.0)
  with pytest.raises(ValueError, match="topk must be >= 0, got -2"):
    decoding.temperature_sample(cache, fn, 1, 2, topk=-2)


# ---- through the tiny model -------------------------------------------------------------------


@pytest.fixture(scope="module")
def model_and_params():
  batch = tiny_batch()
  module, params = init_params(tiny_config("network", 2), batch)
  return EncoderDecoderModel(module), params, batch


def test_top1_sampling_is_greedy_and_sampling_varies_with_rng(model_and_params):
  model, params, batch = model_and_params
  greedy = model.predict_batch(params, batch)
  sampler = model.with_decode_fn(decoding.sample)
  top1 = sampler.predict_batch(params, batch, jax.random.PRNGKey(3), decoder_params={"topk": 1})
  np.testing.assert_array_equal(np.asarray(top1), np.asarray(greedy))
  samples = {tuple(np.asarray(sampler.predict_batch(
      params, batch, jax.random.PRNGKey(s), decoder_params={"temperature": 5.0})).ravel())
             for s in range(4)}
  assert len(samples) > 1


def test_decoding_stops_at_eos_and_pads_after_it(model_and_params):
  _, params, batch = model_and_params
  module, _ = init_params(tiny_config("network", 2), batch)
  # EOS = a token greedy decoding produces, so that rows end early.
  first = np.asarray(EncoderDecoderModel(module, eos_id=-1).predict_batch(params, batch))
  eos = int(first[0, 1])
  tokens = np.asarray(EncoderDecoderModel(module, eos_id=eos).predict_batch(params, batch))
  ended = 0
  for row in tokens:
    hits = np.flatnonzero(row == eos)
    if hits.size:
      ended += 1
      assert np.all(row[hits[0] + 1:] == 0)
  assert ended >= 1


@pytest.mark.parametrize("vocab", [1, 127, 128, 300, 32128])
def test_argmax_last_is_jnp_argmax(vocab):
  """The greedy step's blocked argmax picks jnp.argmax's index: random rows, a tie (the first
  maximum wins, across blocks too), a NaN (with no +inf in its row), a row of -inf, a vocabulary
  not a multiple of 128."""
  rng = np.random.default_rng(vocab)
  x = rng.standard_normal((6, vocab)).astype(np.float32)
  x[1, :] = 0.0                                        # every entry a tie: index 0
  x[2, vocab // 2] = x[2, -1] = 50.0                   # tie across blocks: the first
  x[3, :] = -np.inf
  x[4, vocab // 3] = np.nan
  x[5, -1] = 60.0                                      # the maximum in a padded last block
  got = jax.jit(decoding.argmax_last)(jnp.asarray(x))
  np.testing.assert_array_equal(got, jnp.argmax(jnp.asarray(x), axis=-1))
  assert got[5] == vocab - 1 and got[1] == 0
