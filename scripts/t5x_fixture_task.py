"""A tiny seqio task for running t5x's own train/eval/infer on gqa_t5's network
(scripts/t5x_end_to_end.sh).

The data and vocabulary are the t5x_tiny fixture's (tests/fixtures/t5x_tiny): inputs are
"name: " + the first paragraph of a standard-library docstring, targets its qualified name.
Import this module (t5x's MIXTURE_OR_TASK_MODULE) to register `t5x_tiny_names`.
"""

import os

import seqio
import tensorflow as tf

import fixture_paths

TASK = "t5x_tiny_names"
VOCABULARY = seqio.SentencePieceVocabulary(
    os.path.join(fixture_paths.T5X_TINY, "spm.model"), extra_ids=100)


def _rows(split, shuffle_files=False, seed=None):
  del shuffle_files, seed
  path = os.path.join(fixture_paths.T5X_TINY, "data", f"{split}.tsv")
  lines = tf.data.TextLineDataset(path)
  fields = lines.map(lambda line: tf.strings.split(line, "\t"))
  return fields.map(lambda f: {"inputs": tf.strings.join(["name: ", f[0]]), "targets": f[1]})


def exact_match(targets, predictions):
  return {"exact_match": 100.0 * sum(t == p for t, p in zip(targets, predictions))
                         / max(len(targets), 1)}


if TASK not in seqio.TaskRegistry.names():
  features = {name: seqio.Feature(VOCABULARY, add_eos=True) for name in ("inputs", "targets")}
  seqio.TaskRegistry.add(
      TASK, source=seqio.FunctionDataSource(_rows, splits=("train", "validation")),
      preprocessors=[seqio.preprocessors.tokenize, seqio.preprocessors.append_eos_after_trim],
      output_features=features, metric_fns=[exact_match])
