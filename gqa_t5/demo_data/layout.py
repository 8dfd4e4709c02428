"""Where the demo data lives and whether it is complete. Standard library only.

A data directory is complete when its marker `COMPLETE.json` exists, names this format
version, and every file it lists is present with the size it records. `prepare` writes the
marker last, after every other file is in place, so an interrupted run never looks complete.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Optional, Union

DATA_DIR_ENV_VAR = "GQA_T5_DEMO_DATA"
DEFAULT_DATA_DIR = Path("~/.cache/gqa_t5/demo_data")
FORMAT_VERSION = 1

MARKER = "COMPLETE.json"
DATA_CARD_MD = "DATA_CARD.md"
DATA_CARD_JSON = "data_card.json"
VOCAB_DIR = "vocab"
VOCAB_MODEL = "vocab/spm.model"

# Each data set: folder name and splits, one JSON-lines file per split.
DATASETS = {
    "pretrain": ("train", "validation"),
    "summarize": ("train", "validation", "test"),
    "translate_en_de": ("train", "validation", "test"),
    "qa": ("train", "validation", "test"),
}

# Default feature lengths of the demo tasks (re-exported by gqa_t5.tasks.lengths); here so
# that preparing the data, which reports how much text each length keeps, needs no seqio.
DEMO_FEATURE_LENGTHS = {
    "demo_span_corruption": {"inputs": 256, "targets": 58},
    "demo_summarize": {"inputs": 256, "targets": 32},
    "demo_translate_en_de": {"inputs": 128, "targets": 128},
    "demo_qa": {"inputs": 384, "targets": 32},
}

PathLike = Union[str, os.PathLike]


class DemoDataMissingError(FileNotFoundError):
  """The demo data directory is missing or incomplete."""


def data_dir(path: Optional[PathLike] = None) -> Path:
  """`path`, else `$GQA_T5_DEMO_DATA`, else ~/.cache/gqa_t5/demo_data (not created)."""
  chosen = path or os.environ.get(DATA_DIR_ENV_VAR) or DEFAULT_DATA_DIR
  return Path(chosen).expanduser().absolute()


def split_path(root: PathLike, dataset: str, split: str) -> Path:
  if dataset not in DATASETS or split not in DATASETS[dataset]:
    raise KeyError(f"No demo data set/split {dataset}/{split}; known: {DATASETS}.")
  return Path(root) / dataset / f"{split}.jsonl"


def vocab_path(root: PathLike) -> Path:
  return Path(root) / VOCAB_MODEL


def read_marker(root: PathLike) -> Optional[dict]:
  """The parsed marker, or None when absent or unreadable."""
  try:
    with open(Path(root) / MARKER, encoding="utf-8") as f:
      marker = json.load(f)
  except (OSError, json.JSONDecodeError):
    return None
  return marker if isinstance(marker, dict) else None


def incomplete_reason(root: PathLike) -> Optional[str]:
  """None when `root` holds complete demo data, else what is wrong, in words."""
  root = Path(root)
  if not root.is_dir():
    return f"demo data directory {root} does not exist"
  marker = read_marker(root)
  if marker is None:
    return f"{root} has no readable {MARKER} (never prepared, or interrupted)"
  if marker.get("format_version") != FORMAT_VERSION:
    return (f"{root / MARKER} has format version {marker.get('format_version')!r}, "
            f"this code reads {FORMAT_VERSION}")
  for relative, entry in sorted(marker.get("files", {}).items()):
    path = root / relative
    if not path.is_file():
      return f"{path} is listed in {MARKER} but missing"
    if path.stat().st_size != entry.get("size"):
      return f"{path} has {path.stat().st_size} bytes, {MARKER} says {entry.get('size')}"
  return None


def is_complete(root: Optional[PathLike] = None) -> bool:
  return incomplete_reason(data_dir(root)) is None


def require_complete(root: Optional[PathLike] = None) -> Path:
  """The data directory, or DemoDataMissingError saying what is missing and what to run."""
  root = data_dir(root)
  reason = incomplete_reason(root)
  if reason is not None:
    raise DemoDataMissingError(
        f"No complete demo data: {reason}. Run `gqa-t5 prepare-demo-data --dir {root}` "
        f"(or set ${DATA_DIR_ENV_VAR} to a prepared directory).")
  return root


def sha256_file(path: PathLike, chunk_size: int = 1 << 20) -> str:
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(chunk_size), b""):
      digest.update(chunk)
  return digest.hexdigest()


def verify_checksums(root: Optional[PathLike] = None) -> list[str]:
  """Files whose sha256 differs from the marker's (empty when all match)."""
  root = require_complete(root)
  marker = read_marker(root)
  return [relative for relative, entry in sorted(marker["files"].items())
          if sha256_file(root / relative) != entry["sha256"]]
