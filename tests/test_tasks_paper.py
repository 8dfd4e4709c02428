"""The paper's seqio tasks on mocked TFDS data (no downloads) and MediaSum's JSON files."""

import json
from pathlib import Path

import numpy as np
import pytest

import fixture_paths
pytest.importorskip("tensorflow")  # the data extra; absent on a TensorFlow-free GPU box
pytest.importorskip("seqio")  # the data extra; absent on a TensorFlow-free GPU box
import seqio
import tensorflow as tf
import tensorflow_datasets as tfds

import gqa_t5.tasks  # Registers the tasks.  # pylint: disable=unused-import
from gqa_t5.tasks import lengths
from gqa_t5.tasks import mediasum
from gqa_t5.tasks import metrics
from gqa_t5.tasks import paper
from gqa_t5.tasks import preprocessors
from gqa_t5.tasks import vocab

FIXTURE = Path(fixture_paths.T5X_TINY)
EOS = 1
SHORT = {"inputs": 12, "targets": 16}


@pytest.fixture(scope="module")
def tiny_vocab():
  vocabulary = vocab.get_vocabulary(str(FIXTURE / "spm.model"))
  paper.register_paper_tasks(vocabulary=vocabulary)
  yield vocabulary
  paper.register_paper_tasks()  # Back to the default vocabulary.


def test_import_registers_every_paper_task_without_opening_the_vocabulary(monkeypatch):
  monkeypatch.delenv(vocab.VOCAB_ENV_VAR, raising=False)
  paper.register_paper_tasks()
  for name in paper.PAPER_TASK_NAMES:
    task = seqio.get_mixture_or_task(name)
    vocabulary = task.output_features["targets"].vocabulary
    assert vocabulary.sentencepiece_model_file == vocab.DEFAULT_VOCAB_PATH
    assert vocabulary.extra_ids == 100
    assert vocabulary._model is None  # Lazy: gs:// is never opened here.
    assert task.output_features["inputs"].add_eos and task.output_features["targets"].add_eos
  assert set(paper.PAPER_TASK_NAMES) == set(lengths.PAPER_FEATURE_LENGTHS)
  # Registering again (or importing again) replaces, it does not fail.
  paper.register_paper_tasks()


def test_vocabulary_override(monkeypatch):
  monkeypatch.setenv(vocab.VOCAB_ENV_VAR, "/local/t5.model")
  assert vocab.get_vocabulary().sentencepiece_model_file == "/local/t5.model"
  assert vocab.get_vocabulary("/other.model").sentencepiece_model_file == "/other.model"
  monkeypatch.delenv(vocab.VOCAB_ENV_VAR)
  assert vocab.get_vocabulary().sentencepiece_model_file == vocab.DEFAULT_VOCAB_PATH


def test_paper_lengths_table():
  assert lengths.feature_lengths("cnn_dailymail") == {"inputs": 512, "targets": 256}
  for name in ("arxiv", "pubmed", "multi_news", "mediasum"):
    assert lengths.feature_lengths(name) == {"inputs": 2048, "targets": 512}
  assert lengths.feature_lengths("wmt14_en_de") == {"inputs": 512, "targets": 256}
  assert lengths.feature_lengths("trivia_qa") == {"inputs": 2048, "targets": 32}
  with pytest.raises(KeyError, match="No default feature lengths for task 'nope'"):
    lengths.feature_lengths("nope")


def check_example(example, sequence_length):
  for feature in ("inputs", "targets"):
    tokens = example[feature]
    assert tokens.dtype == np.int32 and tokens.ndim == 1, feature
    assert 2 <= len(tokens) <= sequence_length[feature], (feature, len(tokens))
    assert tokens[-1] == EOS and EOS not in tokens[:-1], feature
    assert 0 not in tokens, feature  # No padding before the feature converter.


@pytest.mark.parametrize("name", sorted(paper.TFDS_NAMES))
def test_every_tfds_task_on_mock_data(tiny_vocab, name):
  """Random mock examples: shapes, dtypes, lengths and EOS, on every split."""
  task = seqio.get_mixture_or_task(name)
  sequence_length = {"inputs": 8, "targets": 4}  # Short enough to trim mock text.
  with tfds.testing.mock_data(num_examples=3):
    for split in ("train", "validation"):
      examples = list(task.get_dataset(
          sequence_length, split=split, shuffle=False, seed=0,
          try_in_mem_cache=False,  # Mocks without TFDS metadata have no split sizes.
      ).as_numpy_iterator())
      assert examples, (name, split)
      for example in examples:
        check_example(example, sequence_length)
  assert any(len(ex["inputs"]) == 8 for ex in examples)


def fake_tfds(records):
  """An `as_dataset_fn` for tfds.testing.mock_data serving `records` on every split."""
  def as_dataset(self, *args, **kwargs):
    del self, args, kwargs
    datasets = [tf.data.Dataset.from_tensors(r) for r in records]
    ds = datasets[0]
    for more in datasets[1:]:
      ds = ds.concatenate(more)
    return ds
  return as_dataset


def decode(vocabulary, tokens):
  assert tokens[-1] == EOS
  return vocabulary.decode(tokens[:-1].tolist())


@pytest.mark.parametrize("name,fields", [
    ("cnn_dailymail", ("article", "highlights")),
    ("arxiv", ("article", "abstract")),
    ("pubmed", ("article", "abstract")),
    ("multi_news", ("document", "summary")),
])
def test_summarization_tasks_on_real_text(tiny_vocab, name, fields):
  document = "Return the number of items in a container. The argument may be a sequence."
  summary = "Return the number of items."
  records = [{fields[0]: document, fields[1]: summary, "id": "1", "publisher": "x",
              "section_names": "intro"}]
  task = seqio.get_mixture_or_task(name)
  with tfds.testing.mock_data(as_dataset_fn=fake_tfds(records)):
    (example,) = task.get_dataset({"inputs": 256, "targets": 64}, split="test",
                                  shuffle=False, try_in_mem_cache=False).as_numpy_iterator()
    (short,) = task.get_dataset(SHORT, split="test", shuffle=False,
                                try_in_mem_cache=False).as_numpy_iterator()
  assert decode(tiny_vocab, example["inputs"]) == "summarize: " + document
  assert decode(tiny_vocab, example["targets"]) == summary
  check_example(short, SHORT)
  assert len(short["inputs"]) < len(example["inputs"])
  # Trimming keeps the start and puts EOS last.
  np.testing.assert_array_equal(short["inputs"][:-1], example["inputs"][:SHORT["inputs"] - 1])
  assert seqio.get_mixture_or_task(name).metric_fns[0] is metrics.rouge


def test_wmt14_en_de_on_real_text(tiny_vocab):
  records = [{"en": "Open the file for reading.", "de": "Oeffne die Datei zum Lesen."}]
  task = seqio.get_mixture_or_task("wmt14_en_de")
  with tfds.testing.mock_data(as_dataset_fn=fake_tfds(records)):
    (example,) = task.get_dataset({"inputs": 64, "targets": 64}, split="validation",
                                  shuffle=False, try_in_mem_cache=False).as_numpy_iterator()
  assert decode(tiny_vocab, example["inputs"]) == (
      "translate English to German: Open the file for reading.")
  assert decode(tiny_vocab, example["targets"]) == "Oeffne die Datei zum Lesen."
  assert task.metric_fns[0] is metrics.bleu


def trivia_qa_record():
  return {
      "question": "Who wrote the module?",
      "question_id": "q1",
      "question_source": "web",
      "entity_pages": {"doc_source": ["TagMe"], "filename": ["a.txt"], "title": ["A"],
                       "wiki_context": ["The module was written by Guido van Rossum."]},
      "search_results": {"description": ["d"], "filename": ["b.txt"], "rank": [0],
                         "title": ["B"], "url": ["u"],
                         "search_context": ["It is part of the standard library."]},
      "answer": {"aliases": ["Guido van Rossum", "Guido"],
                 "normalized_aliases": ["guido van rossum", "guido"],
                 "matched_wiki_entity_name": "", "normalized_matched_wiki_entity_name": "",
                 "normalized_value": "guido van rossum", "type": "WikipediaEntity",
                 "value": "Guido van Rossum"},
  }


def test_trivia_qa_on_real_text(tiny_vocab):
  task = seqio.get_mixture_or_task("trivia_qa")
  with tfds.testing.mock_data(as_dataset_fn=fake_tfds([trivia_qa_record()])):
    (example,) = task.get_dataset({"inputs": 128, "targets": 16}, split="validation",
                                  shuffle=False, try_in_mem_cache=False).as_numpy_iterator()
    (short,) = task.get_dataset({"inputs": 8, "targets": 16}, split="validation",
                                shuffle=False, try_in_mem_cache=False).as_numpy_iterator()
  assert " ".join(decode(tiny_vocab, example["inputs"]).split()) == (
      "question: Who wrote the module? context: The module was written by Guido van "
      "Rossum. It is part of the standard library.")
  assert decode(tiny_vocab, example["targets"]) == "Guido van Rossum"
  assert len(short["inputs"]) == 8 and short["inputs"][-1] == EOS
  # Evaluation: every official ground truth, scored with TriviaQA's normalisation.
  answers = task.postprocess_fn(None, example=example, is_target=True)
  assert answers == ["Guido van Rossum", "guido van rossum", "guido"]
  prediction = task.postprocess_fn("Guido.", example=example, is_target=False)
  assert task.metric_fns[0]([answers], [prediction]) == {"em": 100.0, "f1": 100.0}


def test_trivia_qa_context_cut(tiny_vocab):
  record = trivia_qa_record()
  record["entity_pages"]["wiki_context"] = ["x" * 1000]
  ds = preprocessors.trivia_qa(tf.data.Dataset.from_tensors(record),
                               sequence_length={"inputs": 8, "targets": 4})
  (example,) = ds.as_numpy_iterator()
  assert len(example["context"]) == preprocessors.CHARS_PER_TOKEN_BOUND * 8


def write_mediasum(folder: Path):
  interviews = [
      {"id": "NPR-1", "program": "p", "date": "d", "url": "u", "title": "t",
       "summary": "A talk about files.", "utt": ["Hello.", "Open the file."],
       "speaker": ["HOST", "GUEST"]},
      {"id": "CNN-2", "summary": "Another talk.", "utt": ["Hi."], "speaker": ["HOST"]},
  ]
  (folder / mediasum.DIALOGUE_FILE).write_text(json.dumps(interviews))
  (folder / mediasum.SPLIT_FILE).write_text(
      json.dumps({"train": ["CNN-2"], "val": ["NPR-1"], "test": []}))


def test_mediasum_from_official_json(tiny_vocab, tmp_path, monkeypatch):
  write_mediasum(tmp_path)
  monkeypatch.setenv(mediasum.MEDIASUM_DIR_ENV_VAR, str(tmp_path))
  task = seqio.get_mixture_or_task("mediasum")
  examples = list(task.get_dataset({"inputs": 64, "targets": 16}, split="validation",
                                   shuffle=False).as_numpy_iterator())
  assert [ex["id"] for ex in examples] == [b"NPR-1"]
  assert " ".join(decode(tiny_vocab, examples[0]["inputs"]).split()) == (
      "summarize: HOST: Hello. GUEST: Open the file.")
  assert decode(tiny_vocab, examples[0]["targets"]) == "A talk about files."
  assert examples[0]["transcript"].decode() == "HOST: Hello.\nGUEST: Open the file."
  train = list(task.get_dataset(None, split="train", shuffle=False).as_numpy_iterator())
  assert [ex["id"] for ex in train] == [b"CNN-2"]


def test_mediasum_errors_say_what_is_missing(tiny_vocab, tmp_path, monkeypatch):
  task = seqio.get_mixture_or_task("mediasum")
  monkeypatch.delenv(mediasum.MEDIASUM_DIR_ENV_VAR, raising=False)
  with pytest.raises(mediasum.MediaSumDataError, match="GQA_T5_MEDIASUM_DIR is not set"):
    task.get_dataset(None, split="train")
  monkeypatch.setenv(mediasum.MEDIASUM_DIR_ENV_VAR, str(tmp_path / "nowhere"))
  with pytest.raises(mediasum.MediaSumDataError, match="nowhere does not exist"):
    task.get_dataset(None, split="train")
  monkeypatch.setenv(mediasum.MEDIASUM_DIR_ENV_VAR, str(tmp_path))
  (tmp_path / mediasum.SPLIT_FILE).write_text("{}")
  with pytest.raises(mediasum.MediaSumDataError,
                     match=r"lacks news_dialogue\.json.*github\.com/zcgzcgzcg1/MediaSum"):
    task.get_dataset(None, split="train")
  (tmp_path / mediasum.DIALOGUE_FILE).write_text("[]")
  with pytest.raises(mediasum.MediaSumDataError, match="no 'val' list of interview ids"):
    task.get_dataset(None, split="validation")
