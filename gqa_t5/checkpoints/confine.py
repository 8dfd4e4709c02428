"""What a checkpoint may make a reader open, and how large its metadata may say a tensor is.

A checkpoint names files: T5X's msgpack holds tensorstore specs with kvstore paths, an HF shard
index names its shards, TensorFlow's `checkpoint` file names a prefix. A crafted checkpoint could
name an absolute path, a `../` path or a symlink to a file outside it, and the converter would
copy whatever array the user can read into its output. So every file a reader opens is checked
here first: after resolving symlinks it must lie inside the checkpoint's own folder (its
`root`), else CheckpointError names the entry. The one allowance: a Hugging Face hub cache
snapshot (`<repo>/snapshots/<rev>/`), whose files are symlinks into `<repo>/blobs/`, is confined
to its repository folder.

Metadata is bounded before anything is allocated or enumerated: a shape must be non-negative
integers and at most MAX_TENSOR_BYTES, and a chunk grid is compared with the files present before
its keys are listed (a `.zarray` of [2**20, 2**20] in [1, 1] chunks would be 2**40 keys).
"""

from __future__ import annotations

import math
import os
from typing import Any, Optional, Sequence, Tuple

from gqa_t5.checkpoints.errors import CheckpointError

# No T5 tensor comes near this (XXL's embedding is 0.5 GiB in float32); metadata claiming more
# is refused before a reader allocates or enumerates anything for it.
MAX_TENSOR_BYTES = 1 << 36  # 64 GiB
MAX_RANK = 8


def _inside(real_root: str, real: str) -> bool:
  return real == real_root or real.startswith(real_root.rstrip(os.sep) + os.sep)


def hf_root(path: str) -> str:
  """The folder an HF checkpoint's files must lie in: the directory itself, or for a hub cache
  snapshot (`<repo>/snapshots/<rev>`, files symlinked into `<repo>/blobs`) its repository."""
  real = os.path.realpath(path)
  snapshots = os.path.dirname(real)
  repo = os.path.dirname(snapshots)
  if os.path.basename(snapshots) == "snapshots" and os.path.isdir(os.path.join(repo, "blobs")):
    return repo
  return real


def resolve_inside(root: str, path: str, what: str) -> str:
  """`path` with symlinks resolved; CheckpointError naming `what` if that is outside `root`."""
  real_root = os.path.realpath(root)
  real = os.path.realpath(path)
  if not _inside(real_root, real):
    via = f" (through a symlink, to {real})" if os.path.abspath(path) != real else ""
    raise CheckpointError(f"{what}: {path}{via} is outside the checkpoint folder {real_root}; "
                          "a checkpoint may only refer to files inside its own folder, refusing "
                          "to read it")
  return real


def join_inside(root: str, entry: str, what: str, base: Optional[str] = None) -> str:
  """`base/entry` resolved (`base` defaults to `root`); refuses an absolute `entry`, one with
  `..`, or one that resolves (through symlinks) outside `root`, naming `what` and the entry."""
  parts = str(entry).replace("\\", "/").split("/")
  if os.path.isabs(entry) or str(entry).startswith(("/", "\\")):
    raise CheckpointError(f"{what}: path {entry!r} is absolute; a checkpoint may only refer to "
                          f"files inside its own folder {os.path.realpath(root)}, refusing it")
  if ".." in parts:
    raise CheckpointError(f"{what}: path {entry!r} climbs out with '..'; a checkpoint may only "
                          f"refer to files inside its own folder {os.path.realpath(root)}, "
                          "refusing it")
  return resolve_inside(root, os.path.join(root if base is None else base, entry), what)


def check_tree(root: str, directory: str, what: str) -> int:
  """Refuses any symlink under `directory` that resolves outside `root` (naming it); returns
  how many files (not directories) `directory` holds."""
  files = 0
  for parent, dirs, names in os.walk(directory):
    for name in dirs + names:
      entry = os.path.join(parent, name)
      if os.path.islink(entry):
        resolve_inside(root, entry, f"{what}: entry {os.path.relpath(entry, directory)!r}")
    files += len(names)
  return files


def check_shape(shape: Any, itemsize: int, what: str) -> Tuple[int, ...]:
  """`shape` as a tuple of ints, refused unless non-negative integers of a sane rank whose
  tensor fits MAX_TENSOR_BYTES."""
  if not isinstance(shape, (list, tuple)) or len(shape) > MAX_RANK or not all(
      isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
    raise CheckpointError(f"{what}: shape {shape!r} is not a list of at most {MAX_RANK} "
                          "non-negative integers")
  nbytes = math.prod(shape) * itemsize
  if nbytes > MAX_TENSOR_BYTES:
    raise CheckpointError(f"{what}: shape {list(shape)} claims {nbytes} bytes, more than any "
                          f"T5 tensor (limit {MAX_TENSOR_BYTES}); refusing it")
  return tuple(shape)


def chunk_grid(shape: Sequence[int], chunks: Any, what: str) -> Tuple[int, ...]:
  """Chunks per dimension of a zarr array, with `chunks` checked against `shape`."""
  if not isinstance(chunks, (list, tuple)) or len(chunks) != len(shape) or not all(
      isinstance(c, int) and not isinstance(c, bool) and c >= 1 for c in chunks):
    raise CheckpointError(f"{what}: chunks {chunks!r} are not {len(shape)} positive integers "
                          f"for shape {list(shape)}")
  return tuple(max(1, math.ceil(s / c)) for s, c in zip(shape, chunks))
