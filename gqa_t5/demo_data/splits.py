"""Deterministic train/validation/test splits and the pretraining-text filter.

A record's split depends only on a hash of its group key (a Wikipedia title, a Bible
chapter, a QA context), so related records stay together and reruns give the same splits.
Pretraining text that shares a 13-word sequence with any evaluation document is dropped,
so no validation or test document is seen during pretraining.
"""

from __future__ import annotations

import hashlib
import re
from typing import Callable, Iterable, Mapping, Sequence

# Fractions of validation and test; the rest is train.
EVAL_FRACTIONS = {"validation": 0.05, "test": 0.05}
PRETRAIN_VALIDATION_FRACTION = 0.01
OVERLAP_NGRAM = 13  # Words; the contamination test of GPT-3 and later work.

_WORD = re.compile(r"\w+")


def _unit_interval(key: str, salt: str) -> float:
  digest = hashlib.sha256(f"{salt}\x00{key}".encode("utf-8")).digest()
  return int.from_bytes(digest[:8], "big") / 2.0**64


def assign_split(key: str, salt: str, fractions: Mapping[str, float]) -> str:
  """'train' or one of `fractions`' splits, fixed by the hash of (salt, key)."""
  u, start = _unit_interval(key, salt), 0.0
  for split, fraction in fractions.items():
    if start <= u < start + fraction:
      return split
    start += fraction
  return "train"


def split_records(records: Iterable[dict], group_key: Callable[[dict], str], salt: str,
                  fractions: Mapping[str, float] = EVAL_FRACTIONS
                  ) -> dict[str, list[dict]]:
  """{'train': [...], <split>: [...]} keeping the input order within each split."""
  out = {"train": [], **{split: [] for split in fractions}}
  for record in records:
    out[assign_split(group_key(record), salt, fractions)].append(record)
  return out


def word_ngrams(text: str, n: int = OVERLAP_NGRAM) -> set[int]:
  """Hashes of the lower-cased word n-grams of `text` (the whole text if shorter)."""
  words = _WORD.findall(text.lower())
  if len(words) < n:
    return {hash(tuple(words))} if words else set()
  return {hash(tuple(words[i:i + n])) for i in range(len(words) - n + 1)}


class OverlapFilter:
  """Flags texts that share a word n-gram with any of the evaluation texts."""

  def __init__(self, evaluation_texts: Iterable[str], n: int = OVERLAP_NGRAM):
    self.n = n
    self._ngrams = set()
    for text in evaluation_texts:
      self._ngrams |= word_ngrams(text, n)

  def overlaps(self, text: str) -> bool:
    words = _WORD.findall(text.lower())
    if len(words) < self.n:
      return hash(tuple(words)) in self._ngrams
    return any(hash(tuple(words[i:i + self.n])) in self._ngrams
               for i in range(len(words) - self.n + 1))

  def keep(self, records: Sequence[dict], text_of: Callable[[dict], str]
           ) -> tuple[list[dict], int]:
    """(records without overlap, number dropped)."""
    kept = [r for r in records if not self.overlaps(text_of(r))]
    return kept, len(records) - len(kept)


def split_datasets(wiki: Sequence[Mapping], bible: Sequence[Mapping], qa: Sequence[Mapping],
                   passages: Sequence[Mapping]):
  """(datasets {name: {split: records}}, number of pretraining texts dropped for overlap).

  The three tasks are split by group key; pretraining text is the summarization train split's
  documents plus the passages, minus whatever overlaps a validation or test document.
  """
  datasets = {
      "summarize": split_records(wiki, lambda r: r["id"], "summarize"),
      # Whole chapters go to one split: neighbouring verses share wording.
      "translate_en_de": split_records(
          bible, lambda r: r["id"].rsplit(".", 1)[0], "translate_en_de"),
      # All questions on one context go to one split.
      "qa": split_records(qa, lambda r: r["context"], "qa"),
  }
  evaluation_texts = []
  for split in ("validation", "test"):
    evaluation_texts += [r["document"] for r in datasets["summarize"][split]]
    evaluation_texts += [r["summary"] for r in datasets["summarize"][split]]
    evaluation_texts += [r["en"] for r in datasets["translate_en_de"][split]]
    evaluation_texts += [r["de"] for r in datasets["translate_en_de"][split]]
    evaluation_texts += [r["context"] for r in datasets["qa"][split]]
  overlap = OverlapFilter(evaluation_texts)
  candidates = ([{"id": f"wikipedia/{r['id']}", "source": "wikipedia", "text": r["document"]}
                 for r in datasets["summarize"]["train"]] + passages)
  pretrain, dropped = overlap.keep(candidates, lambda r: r["text"])
  datasets["pretrain"] = split_records(
      pretrain, lambda r: r["text"], "pretrain",
      {"validation": PRETRAIN_VALIDATION_FRACTION})

  return datasets, dropped
