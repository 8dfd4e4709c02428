"""Train the demo SentencePiece vocabulary (T5's conventions: pad 0, EOS 1, UNK 2, no BOS).

Seqio adds the 100 sentinel ids on top, so the model's vocabulary is `vocab_size + 100`.
"""

from __future__ import annotations

import io
import os
import random
import string
from pathlib import Path
from typing import Iterable, Iterator

import sentencepiece as spm

DEFAULT_VOCAB_SIZE = 8000
MAX_LINE_CHARS = 2000  # SentencePiece skips longer "sentences"; longer texts are cut.
INPUT_SENTENCE_SIZE = 20_000  # Lines sampled (about 7 MB here): bounds the time to ~30 s.
SEED_SENTENCEPIECE_SIZE = 200_000  # Seed pieces before pruning (default 1M; slower).
# Always in the vocabulary, however rare in the training text: every printable ASCII
# character (prompts such as "question: ... context:" need ':') and German letters.
REQUIRED_CHARS = "".join(
    c for c in string.printable if not c.isspace()) + "äöüÄÖÜß"
SEED = 20230522  # The paper's arXiv date; any fixed value.


def training_lines(texts: Iterable[str], max_chars: int = MAX_LINE_CHARS
                   ) -> Iterator[str]:
  """Each text as lines of at most `max_chars`, cut at spaces."""
  for text in texts:
    while len(text) > max_chars:
      cut = text.rfind(" ", 0, max_chars)
      cut = cut if cut > 0 else max_chars
      yield text[:cut]
      text = text[cut:].lstrip()
    if text:
      yield text


def sample_lines(lines: Iterable[str], size: int = INPUT_SENTENCE_SIZE) -> list:
  """A reproducible uniform sample of `size` lines (all of them when fewer), in input order."""
  lines = list(lines)
  if len(lines) <= size:
    return lines
  keep = sorted(random.Random(SEED).sample(range(len(lines)), size))
  return [lines[i] for i in keep]


def train_vocabulary(texts: Iterable[str], model_prefix: os.PathLike,
                     vocab_size: int = DEFAULT_VOCAB_SIZE,
                     num_threads: int = 1) -> Path:
  """Trains a unigram model on `texts`; writes <prefix>.model and <prefix>.vocab.

  Returns the .model path. The same texts give the same bytes on any machine: the lines are
  sampled here with a fixed seed, and one thread by default, since the model depends on the
  thread count (2 threads: a different model, about 5 s faster here). `num_threads` 0 means
  all CPUs.
  """
  model = io.BytesIO()
  spm.set_random_generator_seed(SEED)
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(sample_lines(training_lines(texts))),
      model_writer=model,
      model_type="unigram",
      vocab_size=vocab_size,
      character_coverage=0.9999,
      required_chars=REQUIRED_CHARS,
      input_sentence_size=0,  # sample_lines has sampled: SentencePiece's own sampling is not
      shuffle_input_sentence=False,  # reproducible across processes, even with its seed set.
      seed_sentencepiece_size=SEED_SENTENCEPIECE_SIZE,
      max_sentence_length=4 * MAX_LINE_CHARS,  # Bytes; non-ASCII text needs more.
      pad_id=0, eos_id=1, unk_id=2, bos_id=-1,
      num_threads=num_threads or (os.cpu_count() or 1),
      minloglevel=2)
  prefix = Path(model_prefix)
  model_path = prefix.with_suffix(".model")
  model_path.write_bytes(model.getvalue())
  processor = spm.SentencePieceProcessor(model_proto=model.getvalue())
  with open(prefix.with_suffix(".vocab"), "w", encoding="utf-8") as f:
    for i in range(processor.get_piece_size()):
      f.write(f"{processor.id_to_piece(i)}\t{processor.get_score(i)}\n")
  return model_path
