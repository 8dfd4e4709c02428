"""Seqio metric functions: `fn(targets, predictions) -> {name: value}`, values in percent.

- `rouge`: ROUGE-1/2/L/Lsum F-measure (rouge-score, no stemming, as T5 reports it). The
  score is the mean over examples (T5 logs the bootstrap median of that mean, a random
  estimate of the same number); rougeLsum splits both texts into sentences first.
- `bleu`: corpus BLEU from sacrebleu with T5's settings (intl tokenizer, exp smoothing).
- `squad`, `trivia_qa`: exact match and token F1, maximised over the reference answers,
  after the official normalisation of each benchmark's evaluation script.

No model, TensorFlow or seqio imports: these run anywhere.
"""

from __future__ import annotations

import collections
import re
import string
from typing import Iterable, Sequence, Union

import sacrebleu
from rouge_score import rouge_scorer

ROUGE_KEYS = ("rouge1", "rouge2", "rougeL", "rougeLsum")

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def _check_same_length(targets: Sequence, predictions: Sequence) -> None:
  if len(targets) != len(predictions):
    raise ValueError(
        f"{len(targets)} targets but {len(predictions)} predictions: a metric needs "
        "one prediction per target.")


def split_sentences(text: str) -> str:
  """One sentence per line, as rougeLsum expects (keeps existing line breaks)."""
  lines = (line.strip() for line in text.splitlines())
  return "\n".join(
      sentence for line in lines for sentence in _SENTENCE_END.split(line) if sentence)


def rouge(targets: Sequence[str], predictions: Sequence[str],
          score_keys: Sequence[str] = ROUGE_KEYS,
          use_stemmer: bool = False) -> dict[str, float]:
  """Mean ROUGE F-measure x100 of each key over the examples."""
  _check_same_length(targets, predictions)
  if not targets:
    raise ValueError("rouge needs at least one example.")
  scorer = rouge_scorer.RougeScorer(list(score_keys), use_stemmer=use_stemmer)
  totals = dict.fromkeys(score_keys, 0.0)
  for target, prediction in zip(targets, predictions):
    # rougeLsum reads sentences from line breaks; the others ignore them.
    scores = scorer.score(split_sentences(target), split_sentences(prediction))
    for key in score_keys:
      totals[key] += scores[key].fmeasure
  return {key: 100.0 * total / len(targets) for key, total in totals.items()}


def bleu(targets: Sequence[Union[str, Sequence[str]]],
         predictions: Sequence[str], tokenizer: str = "intl") -> dict[str, float]:
  """Corpus BLEU (sacrebleu) with T5's settings.

  Args:
    targets: one reference per example, or a list of references per example (all
      examples must then have the same number, as sacrebleu's streams require).
    predictions: one hypothesis per example.
    tokenizer: sacrebleu tokenizer; T5 uses "intl".
  """
  _check_same_length(targets, predictions)
  if targets and not isinstance(targets[0], str):
    counts = {len(refs) for refs in targets}
    if len(counts) != 1:
      raise ValueError(f"bleu: examples have different numbers of references {counts}.")
    reference_streams = [list(stream) for stream in zip(*targets)]
  else:
    reference_streams = [list(targets)]
  result = sacrebleu.corpus_bleu(
      list(predictions), reference_streams, smooth_method="exp", smooth_value=0.0,
      force=False, lowercase=False, tokenize=tokenizer, use_effective_order=False)
  return {"bleu": result.score}


def _normalize(text: str, punctuation: Iterable[str], replacement: str) -> str:
  punctuation = set(punctuation)
  text = "".join(replacement if ch in punctuation else ch for ch in text.lower())
  text = re.sub(r"\b(a|an|the)\b", " ", text)
  return " ".join(text.split())


def normalize_squad(answer: str) -> str:
  """SQuAD v1.1's normalisation: lower case, no punctuation, articles or extra spaces."""
  return _normalize(answer, string.punctuation, "")


def normalize_trivia_qa(answer: str) -> str:
  """TriviaQA's: as SQuAD's, but punctuation (and quotes, underscore) becomes a space."""
  return _normalize(answer, string.punctuation + "‘’´`_", " ")


def _token_f1(target: str, prediction: str) -> float:
  target_tokens, prediction_tokens = target.split(), prediction.split()
  overlap = sum(
      (collections.Counter(target_tokens) & collections.Counter(prediction_tokens)).values())
  if overlap == 0:
    return 0.0
  precision = overlap / len(prediction_tokens)
  recall = overlap / len(target_tokens)
  return 2 * precision * recall / (precision + recall)


def _qa_scores(targets, predictions, normalize) -> dict[str, float]:
  _check_same_length(targets, predictions)
  if not targets:
    raise ValueError("a QA metric needs at least one example.")
  exact, f1 = 0.0, 0.0
  for answers, prediction in zip(targets, predictions):
    if isinstance(answers, str):
      answers = [answers]
    if not answers:
      raise ValueError(f"an example has no reference answer (prediction {prediction!r}).")
    answers = [normalize(a) for a in answers]
    prediction = normalize(prediction)
    exact += max(float(a == prediction) for a in answers)
    f1 += max(_token_f1(a, prediction) for a in answers)
  return {"em": 100.0 * exact / len(targets), "f1": 100.0 * f1 / len(targets)}


def squad(targets: Sequence[Union[str, Sequence[str]]],
          predictions: Sequence[str]) -> dict[str, float]:
  """Exact match and F1 x100 with SQuAD's normalisation (targets: answers per example)."""
  return _qa_scores(targets, predictions, normalize_squad)


def trivia_qa(targets: Sequence[Union[str, Sequence[str]]],
              predictions: Sequence[str]) -> dict[str, float]:
  """Exact match and F1 x100 with TriviaQA's normalisation."""
  return _qa_scores(targets, predictions, normalize_trivia_qa)
