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


class Task(seqio.Task):
  """A seqio.Task that never caches its source in memory (`try_in_mem_cache` is ignored).

  seqio caches the raw records of any split with fewer than 10,000 examples in memory
  (`ds.cache()` before the preprocessors), which pays only when the whole split is read, and
  more than once. Here it almost never is: training stops after N steps, the probes and the
  teacher-forced losses read their first batches, seqio.Evaluator takes its first
  `num_examples` (and keeps a cache of its own of just those). Each such partial read made
  tf.data discard the half-filled cache and print `cache_dataset_ops.cc ... did not fully read
  the dataset being cached` (about 70 lines per `gqa-t5 reproduce` run, issue 21).

  The cache only memoises the source's records (the preprocessors run after it), so where the
  source yields the same records in the same order on every pass (the demo data's files; any
  single pass, as every evaluation is) the examples and batches are the same without it. A
  TFDS source that shuffles its files may now order them differently from the second epoch on
  (the cache replayed the first epoch's order); only a split under seqio's threshold was
  cached, and on a pod that threshold is 10,000 examples times the number of hosts.
  """

  def get_dataset(self, *args, try_in_mem_cache: bool = False, **kwargs):
    del try_in_mem_cache  # Mixture.get_dataset passes True: refused for every caller.
    return super().get_dataset(*args, try_in_mem_cache=False, **kwargs)


def add_task(name: str, **task_kwargs) -> seqio.Task:
  """Registers `name` (a `Task`: no in-memory cache), replacing an earlier registration of
  that name."""
  seqio.TaskRegistry.remove(name)
  return seqio.TaskRegistry.add(name, task_cls=Task, **task_kwargs)


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
