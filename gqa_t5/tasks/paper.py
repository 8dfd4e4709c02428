"""The paper's seqio tasks (TFDS-backed, except MediaSum's JSON files).

  c4_span_corruption  TFDS c4/en                      T5 span corruption   512 -> 114
  cnn_dailymail       TFDS cnn_dailymail              article -> highlights 512 -> 256
  arxiv, pubmed       TFDS scientific_papers/*        article -> abstract  2048 -> 512
  multi_news          TFDS multi_news                 document -> summary  2048 -> 512
  mediasum            official JSON ($GQA_T5_MEDIASUM_DIR) transcript -> summary 2048 -> 512
  wmt14_en_de         TFDS wmt14_translate/de-en      English -> German     512 -> 256
  trivia_qa           TFDS trivia_qa/rc               question + evidence -> answer 2048 -> 32

Lengths are defaults (`lengths.PAPER_FEATURE_LENGTHS`); seqio takes them per call.
"""

from __future__ import annotations

import functools
from typing import Optional

import seqio

from gqa_t5.tasks import lengths
from gqa_t5.tasks import mediasum
from gqa_t5.tasks import metrics
from gqa_t5.tasks import preprocessors
from gqa_t5.tasks import registration
from gqa_t5.tasks import vocab

# Pinned TFDS versions (those of tensorflow-datasets 4.9), so results stay comparable.
TFDS_NAMES = {
    "c4_span_corruption": "c4/en:3.1.0",
    "cnn_dailymail": "cnn_dailymail:3.4.0",
    "arxiv": "scientific_papers/arxiv:1.1.1",
    "pubmed": "scientific_papers/pubmed:1.1.1",
    "multi_news": "multi_news:2.1.0",
    "wmt14_en_de": "wmt14_translate/de-en:1.0.0",
    "trivia_qa": "trivia_qa/rc:1.1.0",
}
# TFDS field names of (document, summary) for the summarization tasks.
_SUMMARY_FIELDS = {
    "cnn_dailymail": ("article", "highlights"),
    "arxiv": ("article", "abstract"),
    "pubmed": ("article", "abstract"),
    "multi_news": ("document", "summary"),
}

PAPER_TASK_NAMES = tuple(lengths.PAPER_FEATURE_LENGTHS)


def _inputs_length(name: str) -> int:
  return lengths.PAPER_FEATURE_LENGTHS[name]["inputs"]


def register_paper_tasks(vocabulary: Optional[seqio.Vocabulary] = None,
                         mediasum_dir: Optional[str] = None) -> list[str]:
  """(Re-)registers every task of the paper; returns their names.

  Args:
    vocabulary: defaults to `vocab.get_vocabulary()` (T5's, or `$GQA_T5_VOCAB`).
    mediasum_dir: folder of MediaSum's JSON files; defaults to `$GQA_T5_MEDIASUM_DIR`,
      read when the dataset is built, not now.
  """
  vocabulary = vocabulary or vocab.get_vocabulary()
  features = registration.text_features(vocabulary)

  registration.add_span_corruption_task(
      "c4_span_corruption",
      seqio.TfdsDataSource(tfds_name=TFDS_NAMES["c4_span_corruption"]),
      vocabulary, _inputs_length("c4_span_corruption"))

  _register_summarization(features, mediasum_dir)

  registration.add_task(
      "wmt14_en_de",
      source=seqio.TfdsDataSource(tfds_name=TFDS_NAMES["wmt14_en_de"]),
      preprocessors=[
          functools.partial(preprocessors.translate, source_key="en", target_key="de"),
          *registration.tokenize_and_trim()],
      output_features=features,
      metric_fns=list(registration.TRANSLATION_METRICS))

  registration.add_task(
      "trivia_qa",
      source=seqio.TfdsDataSource(tfds_name=TFDS_NAMES["trivia_qa"]),
      preprocessors=[
          functools.partial(preprocessors.trivia_qa,
                            default_inputs_length=_inputs_length("trivia_qa")),
          *registration.tokenize_and_trim()],
      output_features=features,
      postprocess_fn=preprocessors.qa_answers,
      metric_fns=[metrics.trivia_qa])
  return list(PAPER_TASK_NAMES)


def _register_summarization(features, mediasum_dir: Optional[str]) -> None:
  """The five TFDS summarization tasks and MediaSum (JSON files), scored with ROUGE."""
  for name, (document, summary) in _SUMMARY_FIELDS.items():
    registration.add_task(
        name,
        source=seqio.TfdsDataSource(tfds_name=TFDS_NAMES[name]),
        preprocessors=[
            functools.partial(preprocessors.summarize, document_key=document,
                              summary_key=summary),
            *registration.tokenize_and_trim()],
        output_features=features,
        metric_fns=list(registration.SUMMARY_METRICS))

  registration.add_task(
      "mediasum",
      source=seqio.FunctionDataSource(
          dataset_fn=functools.partial(mediasum.mediasum_dataset_fn,
                                       data_dir=mediasum_dir),
          splits=tuple(mediasum.SPLIT_KEYS)),
      preprocessors=[
          functools.partial(preprocessors.summarize, document_key="transcript",
                            summary_key="summary"),
          *registration.tokenize_and_trim()],
      output_features=features,
      metric_fns=list(registration.SUMMARY_METRICS))
