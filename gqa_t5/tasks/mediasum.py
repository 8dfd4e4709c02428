"""MediaSum (Zhu et al. 2021) from the official release's JSON files.

MediaSum is not downloadable through TFDS; get `news_dialogue.json` and
`train_val_test_split.json` from https://github.com/zcgzcgzcg1/MediaSum (the data link in
its README) and point `$GQA_T5_MEDIASUM_DIR` (or the task's `data_dir`) at their folder.
Each example is an interview: 'utt' (utterances) and 'speaker' (who said each), and a
'summary'. The transcript given to the model is one "SPEAKER: utterance" line per turn.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterator, Optional

import tensorflow as tf

MEDIASUM_DIR_ENV_VAR = "GQA_T5_MEDIASUM_DIR"
DIALOGUE_FILE = "news_dialogue.json"
SPLIT_FILE = "train_val_test_split.json"
# seqio split name -> key in the official split file.
SPLIT_KEYS = {"train": "train", "validation": "val", "test": "test"}
_HOW_TO_GET = (
    f"Download {DIALOGUE_FILE} and {SPLIT_FILE} from the MediaSum release "
    "(https://github.com/zcgzcgzcg1/MediaSum) into one folder and set "
    f"${MEDIASUM_DIR_ENV_VAR} to it.")


class MediaSumDataError(FileNotFoundError):
  """The MediaSum folder is missing, incomplete or not in the official format."""


def mediasum_dir(data_dir: Optional[str] = None) -> Path:
  """The folder holding the release files: `data_dir`, else `$GQA_T5_MEDIASUM_DIR`."""
  location = data_dir or os.environ.get(MEDIASUM_DIR_ENV_VAR)
  if not location:
    raise MediaSumDataError(
        f"No MediaSum folder given: ${MEDIASUM_DIR_ENV_VAR} is not set. {_HOW_TO_GET}")
  folder = Path(location).expanduser()
  if not folder.is_dir():
    raise MediaSumDataError(f"MediaSum folder {folder} does not exist. {_HOW_TO_GET}")
  missing = [name for name in (DIALOGUE_FILE, SPLIT_FILE) if not (folder / name).is_file()]
  if missing:
    raise MediaSumDataError(
        f"MediaSum folder {folder} lacks {', '.join(missing)}. {_HOW_TO_GET}")
  return folder


def transcript(utterances, speakers) -> str:
  """'SPEAKER: utterance' lines, one per turn."""
  if len(utterances) != len(speakers):
    raise ValueError(
        f"{len(utterances)} utterances but {len(speakers)} speakers in one interview.")
  return "\n".join(f"{speaker}: {utt}" for speaker, utt in zip(speakers, utterances))


def _load_json(path: Path):
  try:
    with open(path, encoding="utf-8") as f:
      return json.load(f)
  except json.JSONDecodeError as e:
    raise MediaSumDataError(f"{path} is not valid JSON ({e}). {_HOW_TO_GET}") from e


def split_ids(folder: Path, split: str) -> set[str]:
  """The interview ids of `split` from the official split file."""
  if split not in SPLIT_KEYS:
    raise ValueError(f"Unknown MediaSum split {split!r}; known: {sorted(SPLIT_KEYS)}.")
  ids = _load_json(folder / SPLIT_FILE)
  if not isinstance(ids, dict) or not isinstance(ids.get(SPLIT_KEYS[split]), list):
    raise MediaSumDataError(
        f"{folder / SPLIT_FILE} has no {SPLIT_KEYS[split]!r} list of interview ids. "
        + _HOW_TO_GET)
  return set(ids[SPLIT_KEYS[split]])


def iter_interviews(folder: Path, wanted_ids: set[str]) -> Iterator[dict[str, str]]:
  """Yields {'id', 'transcript', 'summary'} of the interviews whose id is wanted."""
  interviews = _load_json(folder / DIALOGUE_FILE)
  if not isinstance(interviews, list):
    raise MediaSumDataError(f"{folder / DIALOGUE_FILE} is not a list of interviews.")
  for record in interviews:
    if record.get("id") not in wanted_ids:
      continue
    missing = [k for k in ("utt", "speaker", "summary") if k not in record]
    if missing:
      raise MediaSumDataError(
          f"Interview {record.get('id')!r} in {folder / DIALOGUE_FILE} lacks {missing}.")
    yield {"id": record["id"],
           "transcript": transcript(record["utt"], record["speaker"]),
           "summary": record["summary"]}


def mediasum_dataset_fn(split: str, shuffle_files: bool = False, seed=None,
                        data_dir: Optional[str] = None) -> tf.data.Dataset:
  """A seqio `FunctionDataSource` dataset_fn over the official JSON files."""
  del shuffle_files, seed  # One file: nothing to shuffle at file level.
  folder = mediasum_dir(data_dir)
  wanted_ids = split_ids(folder, split)  # Checked now, so a bad file fails here.
  signature = {key: tf.TensorSpec([], tf.string) for key in ("id", "transcript", "summary")}
  return tf.data.Dataset.from_generator(lambda: iter_interviews(folder, wanted_ids),
                                        output_signature=signature)
