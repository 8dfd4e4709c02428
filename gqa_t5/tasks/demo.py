"""Seqio tasks over the offline demo data (`gqa-t5 prepare-demo-data`).

  demo_span_corruption   Wikipedia leads + reading-comprehension passages  256 -> 58
  demo_summarize         Wikipedia lead -> its short description          256 -> 32
  demo_translate_en_de   World English Bible -> Elberfelder, per verse     128 -> 128
  demo_qa                SQuAD-shifts question + context -> answer         384 -> 32

They use the SentencePiece vocabulary trained on the demo text, with 100 sentinel ids.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Optional

import seqio
import tensorflow as tf

from gqa_t5.demo_data import layout
from gqa_t5.tasks import lengths
from gqa_t5.tasks import metrics
from gqa_t5.tasks import preprocessors
from gqa_t5.tasks import registration
from gqa_t5.tasks import vocab

DEMO_TASK_NAMES = tuple(lengths.DEMO_FEATURE_LENGTHS)

# Fields of each demo data set's JSON lines (all strings, but 'answers': a list).
_FIELDS = {
    "pretrain": ("id", "source", "text"),
    "summarize": ("id", "document", "summary"),
    "translate_en_de": ("id", "en", "de"),
    "qa": ("id", "title", "context", "question", "answers"),
}


def _jsonl_dataset_fn(split: str, shuffle_files: bool = False, seed=None, *,
                      root: str, dataset: str) -> tf.data.Dataset:
  """Reads one split file of the demo data as a tf.data.Dataset of dicts."""
  del shuffle_files, seed  # One file per split.
  path = layout.split_path(root, dataset, split)
  if not path.is_file():
    layout.require_complete(root)  # Says what is missing and how to get it.
    raise FileNotFoundError(f"{path} is missing although {root} is marked complete.")
  signature = {
      field: tf.TensorSpec([None] if field == "answers" else [], tf.string)
      for field in _FIELDS[dataset]}

  def records():
    with open(path, encoding="utf-8") as f:
      for line in f:
        record = json.loads(line)
        yield {field: record[field] for field in _FIELDS[dataset]}

  return tf.data.Dataset.from_generator(records, output_signature=signature)


def _source(root: Path, dataset: str, counts: dict) -> seqio.FunctionDataSource:
  splits = layout.DATASETS[dataset]
  return seqio.FunctionDataSource(
      dataset_fn=functools.partial(_jsonl_dataset_fn, root=str(root), dataset=dataset),
      splits=splits,
      num_input_examples={s: counts[dataset][s] for s in splits} if counts else None)


def demo_vocabulary(root: Optional[str] = None) -> seqio.SentencePieceVocabulary:
  """The demo data's own SentencePiece vocabulary (100 sentinel ids)."""
  return vocab.get_vocabulary(str(layout.vocab_path(layout.data_dir(root))))


def register_demo_tasks(data_dir: Optional[str] = None) -> list[str]:
  """(Re-)registers the demo tasks over a complete demo data directory.

  Raises:
    layout.DemoDataMissingError: the directory is missing or incomplete (the message
      says what to run).
  """
  root = layout.require_complete(data_dir)
  counts = (layout.read_marker(root) or {}).get("counts", {})
  vocabulary = vocab.get_vocabulary(str(layout.vocab_path(root)))
  features = registration.text_features(vocabulary)

  registration.add_span_corruption_task(
      "demo_span_corruption", _source(root, "pretrain", counts), vocabulary,
      lengths.DEMO_FEATURE_LENGTHS["demo_span_corruption"]["inputs"])

  registration.add_task(
      "demo_summarize",
      source=_source(root, "summarize", counts),
      preprocessors=[
          functools.partial(preprocessors.summarize, document_key="document",
                            summary_key="summary"),
          *registration.tokenize_and_trim()],
      output_features=features,
      metric_fns=list(registration.SUMMARY_METRICS))

  registration.add_task(
      "demo_translate_en_de",
      source=_source(root, "translate_en_de", counts),
      preprocessors=[
          functools.partial(preprocessors.translate, source_key="en", target_key="de"),
          *registration.tokenize_and_trim()],
      output_features=features,
      metric_fns=list(registration.TRANSLATION_METRICS))

  registration.add_task(
      "demo_qa",
      source=_source(root, "qa", counts),
      preprocessors=[preprocessors.squad_style_qa, *registration.tokenize_and_trim()],
      output_features=features,
      postprocess_fn=preprocessors.qa_answers,
      metric_fns=[metrics.squad])
  return list(DEMO_TASK_NAMES)


def register_demo_tasks_if_present(data_dir: Optional[str] = None) -> list[str]:
  """Registers the demo tasks when complete demo data exists; else registers nothing."""
  if not layout.is_complete(data_dir):
    return []
  return register_demo_tasks(data_dir)
