"""Idempotent seqio registration helpers shared by the paper and demo tasks."""

from __future__ import annotations

import functools
from typing import Sequence

import seqio

from gqa_t5.tasks import metrics
from gqa_t5.tasks import span_corruption


def text_features(vocabulary: seqio.Vocabulary) -> dict[str, seqio.Feature]:
  """'inputs' and 'targets' over one vocabulary, both ending in EOS (as T5)."""
  return {
      "inputs": seqio.Feature(vocabulary=vocabulary, add_eos=True),
      "targets": seqio.Feature(vocabulary=vocabulary, add_eos=True),
  }


def tokenize_and_trim() -> list:
  """Seqio's tokenize, then EOS appended after trimming to the requested lengths."""
  return [seqio.preprocessors.tokenize, seqio.preprocessors.append_eos_after_trim]


def add_task(name: str, **task_kwargs) -> seqio.Task:
  """Registers `name`, replacing an earlier registration of that name."""
  seqio.TaskRegistry.remove(name)
  return seqio.TaskRegistry.add(name, **task_kwargs)


def add_span_corruption_task(name: str, source: seqio.DataSource,
                             vocabulary: seqio.Vocabulary,
                             default_inputs_length: int) -> seqio.Task:
  """Registers T5's span corruption over a source with a 'text' field.

  `default_inputs_length` applies when `get_dataset` is given no sequence length.
  """
  return add_task(
      name,
      source=source,
      preprocessors=[
          functools.partial(seqio.preprocessors.rekey,
                            key_map={"inputs": None, "targets": "text"}),
          seqio.preprocessors.tokenize,
          seqio.CacheDatasetPlaceholder(),
          functools.partial(span_corruption.span_corruption,
                            default_inputs_length=default_inputs_length),
          seqio.preprocessors.append_eos_after_trim,
      ],
      output_features=text_features(vocabulary),
      metric_fns=[])


SUMMARY_METRICS: Sequence = (metrics.rouge,)
TRANSLATION_METRICS: Sequence = (metrics.bleu,)
