"""Text-to-text preprocessors (raw TFDS / JSON fields -> 'inputs' and 'targets' strings).

Each keeps the fields that evaluation needs (e.g. 'answers' for QA) and drops nothing else
seqio relies on. Tokenization, EOS and trimming are seqio's own preprocessors, applied after.
"""

from __future__ import annotations

import seqio
import tensorflow as tf

SUMMARIZE_PREFIX = "summarize: "
TRANSLATE_EN_DE_PREFIX = "translate English to German: "

# TriviaQA evidence can run to megabytes; tokenizing it all only to trim to 2048 tokens would
# be wasted work. SentencePiece pieces are at most 16 characters (its default
# max_piece_length), so 16 characters per input token keeps enough text for the trim
# (unless the text is mostly runs of spaces, which normalisation collapses).
CHARS_PER_TOKEN_BOUND = 16


@seqio.map_over_dataset
def summarize(example, document_key: str, summary_key: str,
              prefix: str = SUMMARIZE_PREFIX):
  """{document_key, summary_key} -> inputs 'summarize: <document>', targets '<summary>'."""
  return {
      **example,
      "inputs": tf.strings.join([prefix, example[document_key]]),
      "targets": example[summary_key],
  }


@seqio.map_over_dataset
def translate(example, source_key: str, target_key: str,
              prefix: str = TRANSLATE_EN_DE_PREFIX):
  """{source_key, target_key} -> inputs '<prefix><source>', targets '<target>'."""
  return {
      **example,
      "inputs": tf.strings.join([prefix, example[source_key]]),
      "targets": example[target_key],
  }


def qa_inputs(question: tf.Tensor, context: tf.Tensor) -> tf.Tensor:
  return tf.strings.join(["question: ", question, " context: ", context])


@seqio.map_over_dataset
def squad_style_qa(example):
  """SQuAD-format {question, context, answers} -> 'question: .. context: ..' -> answer 0.

  'answers' stays in the example: the QA postprocessor scores against all of them.
  """
  return {
      **example,
      "inputs": qa_inputs(example["question"], example["context"]),
      "targets": example["answers"][0],
  }


def trivia_qa(dataset: tf.data.Dataset, sequence_length=None,
              default_inputs_length: int = 2048) -> tf.data.Dataset:
  """TFDS `trivia_qa/rc` -> question plus evidence -> answer value.

  The evidence is the Wikipedia pages' text then the web search results' text; it is cut
  to what can fit the input length (the exact cut is the token trim that follows).
  'answers' holds the official ground truths: the answer value and its normalised aliases.
  """
  inputs_length = (sequence_length or {}).get("inputs") or default_inputs_length
  max_context_chars = CHARS_PER_TOKEN_BOUND * inputs_length

  def convert(example):
    evidence = tf.concat([example["entity_pages"]["wiki_context"],
                          example["search_results"]["search_context"]], axis=0)
    context = tf.strings.reduce_join(evidence, separator="\n")
    context = tf.strings.substr(context, 0, max_context_chars, unit="UTF8_CHAR")
    answer = example["answer"]
    return {
        "question": example["question"],
        "question_id": example["question_id"],
        "context": context,
        "inputs": qa_inputs(example["question"], context),
        "targets": answer["value"],
        "answers": tf.concat([[answer["value"]], answer["normalized_aliases"]], axis=0),
    }

  return dataset.map(convert, num_parallel_calls=tf.data.AUTOTUNE)


def qa_answers(output_or_target, example=None, is_target: bool = False):
  """Seqio postprocessor: a target becomes the list of every reference answer.

  Predictions pass through unchanged (as decoded text).
  """
  if not is_target:
    return output_or_target
  if example is None or "answers" not in example:
    raise ValueError("qa_answers needs the example's 'answers' field to score a target.")
  return [a.decode("utf-8") if isinstance(a, bytes) else str(a)
          for a in example["answers"]]
