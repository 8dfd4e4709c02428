"""The SentencePiece vocabulary of the paper's tasks.

T5X's default is T5's public vocabulary (32,000 pieces + 100 sentinel ids). A local copy,
or any other SentencePiece model, overrides it through an argument or `$GQA_T5_VOCAB`.
Building the vocabulary object never opens the file: seqio loads it on first use.
"""

from __future__ import annotations

import functools
import os
from typing import Optional

import seqio

DEFAULT_VOCAB_PATH = "gs://t5-data/vocabs/cc_all.32000/sentencepiece.model"
EXTRA_IDS = 100  # T5's sentinels <extra_id_0> ... <extra_id_99>.
VOCAB_ENV_VAR = "GQA_T5_VOCAB"


def vocabulary_path(path: Optional[str] = None) -> str:
  """The path to use: `path`, else `$GQA_T5_VOCAB`, else T5's public model."""
  return path or os.environ.get(VOCAB_ENV_VAR) or DEFAULT_VOCAB_PATH


@functools.lru_cache(maxsize=None)
def _cached_vocabulary(path: str, extra_ids: int) -> seqio.SentencePieceVocabulary:
  return seqio.SentencePieceVocabulary(path, extra_ids=extra_ids)


def get_vocabulary(path: Optional[str] = None,
                   extra_ids: int = EXTRA_IDS) -> seqio.SentencePieceVocabulary:
  """Returns a (shared, lazily loaded) SentencePiece vocabulary with sentinel ids."""
  return _cached_vocabulary(vocabulary_path(path), extra_ids)
