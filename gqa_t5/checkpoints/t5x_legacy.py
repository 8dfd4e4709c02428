"""T5X's legacy checkpoint format (what the public T5.1.1 T5X checkpoints use): read and write.

A checkpoint directory holds a msgpack file `checkpoint` =
`{'version': 3, 'optimizer': {'target': <params>, 'state': {'step': ..., 'param_states': ...}}}`.
Small leaves are inline arrays; large ones are tensorstore zarr specs whose kvstore path names a
directory beside the file, called by the dotted tree path ('target.encoder.layers_0.mlp.wo.kernel/').
Specs written on GCS carry a 'gcs' kvstore and a dummy bucket; their paths are relative too, so
every spec resolves against the checkpoint directory.

Reading is lazy (one tensor per `read()`); writing streams one tensor at a time. A written
checkpoint holds the parameters, the step and, when the writer is given them, optimizer states
under 'state/param_states' (the converter writes t5x's Adafactor statistics, zeroed, so that
t5x's restore finds every key its optimizer holds: see `gqa_t5.convert.t5x_state`).
"""

from __future__ import annotations

import json
import math
import os
from typing import Any, Dict, Mapping, Tuple

import numpy as np
import tensorstore as ts

from gqa_t5.checkpoints import confine
from gqa_t5.checkpoints import msgpack_codec
from gqa_t5.checkpoints import source as source_lib
from gqa_t5.checkpoints import tree as tree_lib
from gqa_t5.checkpoints.atomic import atomic_directory, raise_if_interrupted, wait_or_cancel
from gqa_t5.checkpoints.errors import CheckpointError, describe
from gqa_t5.checkpoints.lazy import LazyTensor

FORMAT = "t5x"
CHECKPOINT_FILE = "checkpoint"
VERSION = 3
# Chunks of at most 16 MiB (T5X aims at 64): tensorstore compresses chunks in parallel.
_TARGET_CHUNK_BYTES = 16 * 1024 * 1024
# gzip is what T5X writes; zstd is several times faster and read by any tensorstore (so t5x).
COMPRESSORS = {"gzip": {"id": "gzip", "level": 1}, "zstd": {"id": "zstd", "level": 1},
               "none": None}


def find_checkpoint_file(path: str) -> str:
  """The msgpack file of a T5X checkpoint given its directory (or the file itself)."""
  if os.path.isdir(path):
    for candidate in (os.path.join(path, CHECKPOINT_FILE),
                      os.path.join(path, "state", CHECKPOINT_FILE)):
      if os.path.isfile(candidate):
        confine.resolve_inside(path, candidate, "T5X checkpoint file")
        return candidate
    raise CheckpointError(f"{path} is not a T5X checkpoint directory: no '{CHECKPOINT_FILE}' "
                          "file in it")
  if os.path.isfile(path):
    return path
  raise CheckpointError(f"T5X checkpoint path {path} does not exist")


def _is_ts_spec(node: Any) -> bool:
  return isinstance(node, Mapping) and "driver" in node and ("kvstore" in node or "path" in node)


def _relative_store_path(spec: Mapping[str, Any], name: str) -> str:
  kvstore = spec.get("kvstore")
  if isinstance(kvstore, Mapping) and "path" in kvstore:
    return str(kvstore["path"])
  if "path" in spec:  # tensorstore < 0.1.14 put the path at the top of the spec
    return str(spec["path"])
  raise CheckpointError(f"tensor {name!r}: its tensorstore spec in the msgpack file has no "
                        f"kvstore path (damaged checkpoint?): {spec}")


def _resolve_store_dir(ckpt_dir: str, spec: Mapping[str, Any], name: str) -> str:
  """The local zarr directory of a spec, inside the checkpoint directory. gcs specs (a dummy
  bucket, then a path) and file specs are relative to the checkpoint; an absolute or `..` path,
  or a symlink out of the checkpoint, is refused (the reader would copy a foreign array)."""
  relative = _relative_store_path(spec, name)
  what = f"tensor {name!r}: tensorstore kvstore path"
  if relative.startswith("gs://"):
    relative = relative[len("gs://"):].split("/", 1)[-1]
  relative = relative.rstrip("/")
  candidates = [confine.join_inside(ckpt_dir, relative, what)]
  if os.path.basename(relative) != relative:
    candidates.append(confine.join_inside(ckpt_dir, os.path.basename(relative), what))
  for candidate in candidates:
    if os.path.isdir(candidate):
      return candidate  # symlinks resolved: tensorstore refuses paths with '..'
  raise CheckpointError(f"tensor {name!r}: its zarr directory "
                        f"{os.path.join(ckpt_dir, os.path.basename(relative))} is missing "
                        f"(spec path {relative!r}: a damaged 'checkpoint' file, or a tensor "
                        "directory that was not copied)")


def _zarr_chunk_keys(grid, separator: str):
  """Every chunk key of a grid (already bounded by the files present: see _zarr_metadata)."""
  if not grid:
    return ["0"]
  keys = [""]
  for count in grid:
    keys = [f"{k}{separator if k else ''}{i}" for k in keys for i in range(count)]
  return keys


def _zarr_metadata(ckpt_dir: str, store_dir: str, name: str) -> Dict[str, Any]:
  meta_path = os.path.join(store_dir, ".zarray")
  what = f"tensor {name!r}"
  # Every file tensorstore may open in the array's directory stays inside the checkpoint.
  files = confine.check_tree(ckpt_dir, store_dir, f"{what}: zarr directory {store_dir}")
  try:
    with open(meta_path) as f:
      meta = json.load(f)
  except FileNotFoundError:
    raise CheckpointError(f"{what}: {meta_path} is missing") from None
  except (OSError, ValueError) as error:
    raise CheckpointError(f"{what}: cannot parse {meta_path}: {error}") from error
  if not isinstance(meta, dict):
    raise CheckpointError(f"{what}: {meta_path} is not a JSON object")
  for field in ("shape", "chunks", "dtype"):
    if field not in meta:
      raise CheckpointError(f"{what}: {meta_path} has no {field!r}")
  try:
    itemsize = _zarr_dtype(meta, VERSION).itemsize
  except (TypeError, ValueError) as error:
    raise CheckpointError(f"{what}: {meta_path} has an unknown dtype {meta['dtype']!r}") from error
  shape = confine.check_shape(meta["shape"], itemsize, f"{what}: {meta_path}")
  grid = confine.chunk_grid(shape, meta["chunks"], f"{what}: {meta_path}")
  expected = math.prod(grid)
  chunk_files = files - sum(os.path.isfile(os.path.join(store_dir, n))
                            for n in (".zarray", ".zattrs"))
  # Checked before listing the keys: the grid may be absurd. A few missing chunks are named
  # by the listing below.
  if expected > 4 * chunk_files + 4096:
    raise CheckpointError(f"{what}: {meta_path} says shape {list(shape)} in chunks "
                          f"{meta['chunks']}, which is {expected} chunk files, but {store_dir} "
                          f"holds {chunk_files}: chunk files are missing (or the metadata is "
                          "corrupt)")
  separator = meta.get("dimension_separator", ".")
  if separator not in (".", "/"):
    raise CheckpointError(f"{what}: {meta_path} has dimension_separator {separator!r}")
  raw_size = None  # an uncompressed chunk file holds exactly one chunk
  if meta.get("compressor") is None and not meta.get("filters"):
    raw_size = math.prod(meta["chunks"]) * itemsize
  present = set(os.listdir(store_dir))
  for key in _zarr_chunk_keys(grid, separator):
    # A missing chunk would silently read as the fill value: refuse it instead.
    chunk = os.path.join(store_dir, key)
    if key.split("/")[0] not in present or not os.path.isfile(chunk):
      raise CheckpointError(f"{what}: chunk file {chunk} is missing")
    if raw_size is not None and os.path.getsize(chunk) != raw_size:
      raise CheckpointError(f"{what}: uncompressed chunk file {chunk} holds "
                            f"{os.path.getsize(chunk)} bytes, {meta_path} says {raw_size}")
  return meta


def _zarr_dtype(meta: Mapping[str, Any], version: int) -> np.dtype:
  dtype = meta["dtype"]
  if dtype == "bfloat16":
    return msgpack_codec.dtype_from_name("bfloat16")
  dtype = np.dtype(dtype)
  if version < 3 and dtype == np.uint16:
    # Before version 3, T5X stored bfloat16 arrays bit-cast to uint16.
    return msgpack_codec.dtype_from_name("bfloat16")
  return dtype


def read_zarr(store_dir: str, name: str, dtype: np.dtype) -> np.ndarray:
  """Reads one zarr array with tensorstore, naming the tensor and path on failure."""
  spec = {"driver": "zarr", "kvstore": {"driver": "file", "path": store_dir + "/"}}
  try:
    store = ts.open(spec, open=True, read=True).result()
    value = store.read().result()
  except Exception as error:  # tensorstore raises ValueError/RuntimeError variants
    raise CheckpointError(f"tensor {name!r}: cannot read zarr array {store_dir}: "
                          f"{error}") from error
  value = np.asarray(value)
  if value.dtype == np.uint16 and dtype != np.uint16:
    value = value.view(dtype)
  return value


def _zarr_tensor(ckpt_dir: str, spec: Mapping[str, Any], name: str, version: int) -> LazyTensor:
  store_dir = _resolve_store_dir(ckpt_dir, spec, name)
  meta = _zarr_metadata(ckpt_dir, store_dir, name)
  shape = tuple(meta["shape"])
  spec_shape = spec.get("metadata", {}).get("shape")
  if spec_shape is not None and tuple(spec_shape) != shape:
    raise CheckpointError(f"tensor {name!r}: msgpack spec says shape {tuple(spec_shape)}, "
                          f"{store_dir}/.zarray says {shape}")
  dtype = _zarr_dtype(meta, version)
  return LazyTensor(name, shape, dtype, lambda: read_zarr(store_dir, name, dtype))


def _inline_tensor(name: str, value: Any) -> LazyTensor:
  array = np.asarray(value)
  return LazyTensor(name, array.shape, array.dtype, lambda: array)


def read_state(path: str) -> Tuple[str, Dict[str, Any]]:
  """(checkpoint directory, decoded msgpack tree) of a T5X checkpoint."""
  ckpt_file = find_checkpoint_file(path)
  try:
    with open(ckpt_file, "rb") as f:
      data = f.read()
  except OSError as error:
    raise CheckpointError(f"cannot read T5X checkpoint file {ckpt_file}: {error}") from error
  if not data:
    raise CheckpointError(f"damaged T5X checkpoint: its msgpack file {ckpt_file} is empty")
  try:
    state = msgpack_codec.decode(data)
  except Exception as error:  # msgpack raises many types, some with an empty message
    raise CheckpointError(f"damaged T5X checkpoint: {ckpt_file} ({len(data)} bytes) is not "
                          f"readable msgpack: {describe(error)}") from error
  if not isinstance(state, dict) or "optimizer" not in state:
    raise CheckpointError(f"{ckpt_file} is not a T5X checkpoint: no 'optimizer' entry "
                          f"(keys: {sorted(state) if isinstance(state, dict) else type(state)})")
  return os.path.dirname(ckpt_file), state


def scalar_step(value: Any, where: str) -> int:
  array = np.asarray(value)
  if array.size != 1:
    raise CheckpointError(f"{where}: step has shape {array.shape}, expected a scalar")
  return int(array.reshape(()))


def _tensors_of(ckpt_dir: str, node: Any, prefix: str, version: int) -> Dict[str, LazyTensor]:
  tensors = {}
  if _is_ts_spec(node):
    return {prefix: _zarr_tensor(ckpt_dir, node, prefix, version)}
  if isinstance(node, Mapping):
    for key, value in node.items():
      name = f"{prefix}/{key}" if prefix else str(key)
      tensors.update(_tensors_of(ckpt_dir, value, name, version))
    return tensors
  return {prefix: _inline_tensor(prefix, node)}


def open_t5x(path: str, config=None, validate: bool = True) -> source_lib.CheckpointSource:
  """Opens a T5X legacy checkpoint lazily: only the msgpack file and zarr metadata are read."""
  ckpt_dir, state = read_state(path)
  version = int(state.get("version", 0))
  optimizer = state["optimizer"]
  if "target" not in optimizer:
    raise CheckpointError(f"{ckpt_dir}: T5X checkpoint has no 'optimizer/target' parameters")
  tensors = _tensors_of(ckpt_dir, optimizer["target"], "", version)
  step = optimizer.get("state", {}).get("step", 0)
  source = source_lib.CheckpointSource(path=path, format=FORMAT, tensors=tensors,
                                       step=scalar_step(step, ckpt_dir))
  return source_lib.finish(source, config=config, validate=validate)


def load_t5x(path: str, config=None, dtype=None) -> Tuple[Dict[str, Any], int]:
  """(parameter tree of numpy arrays, step) of a T5X legacy checkpoint."""
  source = open_t5x(path, config=config)
  return source.read_all(dtype), source.step


def choose_chunks(shape, itemsize: int, target_bytes: int = _TARGET_CHUNK_BYTES):
  """A chunk shape dividing `shape`, at most `target_bytes`: split the largest dimension first."""
  chunks = list(shape)
  while chunks and math.prod(chunks) * itemsize > target_bytes:
    axis = max(range(len(chunks)), key=lambda i: chunks[i])
    size = chunks[axis]
    if size == 1:
      break
    factor = next(f for f in range(2, size + 1) if size % f == 0)  # smallest prime factor
    chunks[axis] = size // factor
  return [max(1, c) for c in chunks]


def _ts_dtype_name(dtype: np.dtype) -> str:
  return "bfloat16" if dtype.name == "bfloat16" else dtype.name


def _write_context():
  # No fsync per chunk (it made writing I/O-bound); atomic_directory syncs once before the
  # final rename, which is what makes the checkpoint durable.
  return ts.Context({"file_io_sync": False})


# Where each part of the train state lives in the msgpack tree, and its zarr directory prefix.
_PARTS = {"target": "target", "param_states": "state.param_states"}


class T5XWriter:
  """Streams tensors into a T5X legacy checkpoint directory, one `write` at a time.

  `directory` must exist and be empty (use `atomic_directory`); `finalize` writes the msgpack
  file last, so a directory without it is never a readable checkpoint. `part` 'target' holds
  the parameters, 'param_states' the optimizer's per-parameter states (as t5x's optimizers'
  `state_dict` names them, e.g. 'encoder/layers_0/mlp/wo/kernel/v_row').
  """

  def __init__(self, directory: str, compression: str = "gzip"):
    if compression not in COMPRESSORS:
      raise CheckpointError(f"unknown compression {compression!r}; known: "
                            f"{', '.join(COMPRESSORS)}")
    self.directory = os.path.abspath(directory)
    self._compressor = COMPRESSORS[compression]
    self._specs: Dict[str, Dict[str, Any]] = {part: {} for part in _PARTS}

  def _entries(self, name: str, part: str) -> Dict[str, Any]:
    if part not in _PARTS:
      raise CheckpointError(f"unknown checkpoint part {part!r}; known: {', '.join(_PARTS)}")
    if name in self._specs[part]:
      raise CheckpointError(f"tensor {name!r} written twice")
    return self._specs[part]

  def write(self, name: str, value: np.ndarray, part: str = "target") -> None:
    """Writes one tensor as a zarr array beside the msgpack file (as t5x writes large leaves)."""
    raise_if_interrupted()  # SIGINT/SIGTERM: stop between tensors, never inside one
    value = np.asarray(value)
    entries = self._entries(name, part)
    dir_name = _PARTS[part] + "." + name.replace("/", ".")
    chunks = choose_chunks(value.shape, value.dtype.itemsize)
    compressor = dict(self._compressor) if self._compressor else None
    metadata = {"chunks": chunks, "compressor": compressor, "shape": list(value.shape)}
    spec = {"driver": "zarr", "dtype": _ts_dtype_name(value.dtype),
            "kvstore": {"driver": "file", "path": dir_name + "/"}, "metadata": metadata}
    local = dict(spec, kvstore={"driver": "file",
                                "path": os.path.join(self.directory, dir_name) + "/"})
    try:
      store = ts.open(local, create=True, open=False, context=_write_context()).result()
      # Referencing the source (we wait for the write) spares tensorstore a full copy.
      wait_or_cancel(store.write(value, can_reference_source_data_indefinitely=True))
    except Exception as error:
      raise CheckpointError(f"tensor {name!r}: cannot write {local['kvstore']['path']}: "
                            f"{error}") from error
    entries[name] = spec

  def write_inline(self, name: str, value: np.ndarray, part: str = "param_states") -> None:
    """Stores one (small) tensor inside the msgpack file, as t5x stores its unpartitioned
    leaves (factored Adafactor statistics, (1,) placeholders)."""
    raise_if_interrupted()
    self._entries(name, part)[name] = np.asarray(value)

  def finalize(self, step: int = 0) -> None:
    state: Dict[str, Any] = {"step": np.asarray(step, np.int32)}
    if self._specs["param_states"]:
      state["param_states"] = tree_lib.unflatten(self._specs["param_states"])
    checkpoint = {"version": VERSION,
                  "optimizer": {"target": tree_lib.unflatten(self._specs["target"]),
                                "state": state}}
    with open(os.path.join(self.directory, CHECKPOINT_FILE), "wb") as f:
      f.write(msgpack_codec.encode(checkpoint))


def save_t5x(path: str, params: Mapping[str, Any], step: int = 0, overwrite: bool = False,
             dtype=None, compression: str = "gzip") -> None:
  """Writes a parameter tree as a T5X legacy checkpoint directory (atomically)."""
  flat = tree_lib.flatten(params)
  with atomic_directory(path, overwrite=overwrite) as tmp:
    writer = T5XWriter(tmp, compression=compression)
    for name, value in flat.items():
      value = np.asarray(value)
      writer.write(name, value if dtype is None else value.astype(np.dtype(dtype)))
    writer.finalize(step)
