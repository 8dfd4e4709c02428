"""T5 span corruption: lengths, noise masks, sentinels, and the round trip to the text."""

import functools
from pathlib import Path

import numpy as np
import pytest

import fixture_paths
pytest.importorskip("tensorflow")  # the data extra; absent on a TensorFlow-free GPU box
pytest.importorskip("seqio")  # the data extra; absent on a TensorFlow-free GPU box
import seqio
import tensorflow as tf
import tensorflow_datasets as tfds

from gqa_t5.tasks import paper
from gqa_t5.tasks import registration
from gqa_t5.tasks import span_corruption

FIXTURE = Path(fixture_paths.T5X_TINY)
VOCAB_SIZE = 1100  # The fixture's 1000 pieces + 100 sentinels.

TEXT = (
    "Return a new array of given shape and type, filled with zeros. The optional "
    "argument gives the order in which the elements are stored in memory. This "
    "function is the inverse of the function that reads the data back from a file, "
    "and it raises an error when the file does not exist or cannot be opened for "
    "reading. See the documentation of the module for the list of supported formats.")


@pytest.fixture(scope="module")
def vocabulary():
  return seqio.SentencePieceVocabulary(str(FIXTURE / "spm.model"), extra_ids=100)


def test_lengths_match_t5_pretraining():
  assert span_corruption.span_corruption_lengths(512) == (568, 114)
  # The demo length table uses the value the function gives.
  from gqa_t5.tasks import lengths
  assert lengths.DEMO_FEATURE_LENGTHS["demo_span_corruption"]["targets"] == \
      span_corruption.span_corruption_lengths(256)[1]
  assert lengths.PAPER_FEATURE_LENGTHS["c4_span_corruption"]["targets"] == 114
  with pytest.raises(ValueError, match="inputs_length >= 3"):
    span_corruption.span_corruption_lengths(2)


@pytest.mark.parametrize("num_tokens", [2, 3, 10, 57, 568])
def test_noise_mask_counts_and_start(num_tokens):
  num_noise, num_spans = span_corruption._noise_counts(num_tokens, 0.15, 3.0)
  for s in range(5):
    mask = span_corruption.noise_mask(
        tf.constant(num_tokens), tf.constant([[s, 1], [s, 2]])).numpy()
    assert mask.shape == (num_tokens,)
    assert mask.sum() == num_noise
    assert not mask[0]  # A kept token first, as in T5.
    starts = np.sum(mask[1:] & ~mask[:-1])
    assert starts == num_spans


def merge(inputs, targets, vocab_size):
  """Puts each target span back in place of its sentinel in the inputs."""
  sentinel = lambda t: t >= vocab_size - 100
  spans, current = {}, None
  for t in targets:
    if sentinel(t):
      current = t
      spans[current] = []
    else:
      spans[current].append(t)
  merged = []
  for t in inputs:
    merged.extend(spans[t] if sentinel(t) else [t])
  return merged


def test_corrupt_tokens_structure_and_round_trip():
  tokens = tf.range(10, 110, dtype=tf.int32)
  inputs, targets = span_corruption.corrupt_tokens(tokens, tf.constant([[3, 4], [5, 6]]),
                                                   VOCAB_SIZE)
  inputs, targets = inputs.numpy(), targets.numpy()
  input_sentinels = inputs[inputs >= 1000]
  target_sentinels = targets[targets >= 1000]
  num_noise, num_spans = span_corruption._noise_counts(100, 0.15, 3.0)
  # <extra_id_0> = 1099, then 1098, ... in both, one per noise span.
  np.testing.assert_array_equal(input_sentinels, 1099 - np.arange(num_spans))
  np.testing.assert_array_equal(target_sentinels, 1099 - np.arange(num_spans))
  assert targets[0] == 1099
  assert len(inputs) == 100 - num_noise + num_spans
  assert len(targets) == num_noise + num_spans
  assert merge(inputs.tolist(), targets.tolist(), VOCAB_SIZE) == list(range(10, 110))


def test_task_decodes_back_to_the_original_text(vocabulary):
  """A registered span-corruption task over one document: merged chunks = the text."""
  source = seqio.FunctionDataSource(
      dataset_fn=lambda split, shuffle_files, seed=None: tf.data.Dataset.from_tensors(
          {"text": TEXT}),
      splits=["train"])
  task = registration.add_span_corruption_task(
      "test_span_corruption_round_trip", source, vocabulary, default_inputs_length=512)
  try:
    sequence_length = {"inputs": 32, "targets": 16}
    examples = list(task.get_dataset(sequence_length, split="train", shuffle=False,
                                     seed=7).as_numpy_iterator())
  finally:
    seqio.TaskRegistry.remove("test_span_corruption_round_trip")
  # 34 raw tokens: 5 noise in 2 spans; inputs 29 + 2 + EOS = 32, targets 5 + 2 + EOS = 8
  # (35 would give 33 inputs).
  chunk_length, targets_length = span_corruption.span_corruption_lengths(32)
  assert (chunk_length, targets_length) == (34, 8)
  text_tokens = vocabulary.encode(TEXT)
  assert len(examples) == -(-len(text_tokens) // chunk_length)
  merged = []
  for i, ex in enumerate(examples):
    inputs, targets = ex["inputs"], ex["targets"]
    assert inputs.dtype == np.int32 and targets.dtype == np.int32
    assert inputs[-1] == 1 and targets[-1] == 1  # EOS ends both ...
    assert 1 not in inputs[:-1] and 1 not in targets[:-1]  # ... and only ends them.
    if i < len(examples) - 1:  # Every full chunk fills the inputs exactly.
      assert len(inputs) == 32
      assert len(targets) <= targets_length
    merged.extend(merge(inputs[:-1].tolist(), targets[:-1].tolist(), vocabulary.vocab_size))
  assert merged == text_tokens
  assert vocabulary.decode(merged) == TEXT


def test_task_is_deterministic_for_a_seed(vocabulary):
  source = seqio.FunctionDataSource(
      dataset_fn=lambda split, shuffle_files, seed=None: tf.data.Dataset.from_tensors(
          {"text": TEXT}),
      splits=["train"])
  task = registration.add_span_corruption_task(
      "test_span_corruption_seed", source, vocabulary, default_inputs_length=32)
  try:
    run = functools.partial(task.get_dataset, None, split="train", shuffle=False)
    first = [ex["inputs"].tolist() for ex in run(seed=1).as_numpy_iterator()]
    again = [ex["inputs"].tolist() for ex in run(seed=1).as_numpy_iterator()]
    other = [ex["inputs"].tolist() for ex in run(seed=2).as_numpy_iterator()]
  finally:
    seqio.TaskRegistry.remove("test_span_corruption_seed")
  assert first == again
  assert first != other
  assert max(len(x) for x in first) == 32  # default_inputs_length when none is given.


def test_registered_c4_task_on_mock_data(vocabulary):
  """`c4_span_corruption` over a mocked c4/en: sentinel structure and the round trip."""
  paper.register_paper_tasks(vocabulary=vocabulary)
  try:
    documents = [TEXT, "Close the file and release the memory it holds."]

    def as_dataset(self, *args, **kwargs):
      return tf.data.Dataset.from_tensor_slices(
          {"text": documents, "url": ["u", "v"], "timestamp": ["t", "t"],
           "content-type": ["c", "c"], "content-length": ["1", "1"]})

    task = seqio.get_mixture_or_task("c4_span_corruption")
    with tfds.testing.mock_data(as_dataset_fn=as_dataset):
      examples = list(task.get_dataset({"inputs": 64, "targets": 16}, split="train",
                                       shuffle=False, seed=3,
                                       try_in_mem_cache=False).as_numpy_iterator())
  finally:
    paper.register_paper_tasks()
  merged = []
  for ex in examples:
    inputs, targets = ex["inputs"][:-1], ex["targets"][:-1]  # Without EOS.
    input_sentinels = inputs[inputs >= 1000]
    np.testing.assert_array_equal(input_sentinels, 1099 - np.arange(len(input_sentinels)))
    np.testing.assert_array_equal(targets[targets >= 1000], input_sentinels)
    assert targets[0] == 1099 and inputs[0] < 1000
    merged.extend(merge(inputs.tolist(), targets.tolist(), vocabulary.vocab_size))
  assert len(examples[0]["inputs"]) == 64
  # The stream of both documents, back in order (documents are concatenated, as T5).
  assert merged == vocabulary.encode(documents[0]) + vocabulary.encode(documents[1])
