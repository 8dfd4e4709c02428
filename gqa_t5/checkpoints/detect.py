"""Which format a checkpoint path is in, and one entry point to read any of them.

`load_params(path)` is what training calls for INITIAL_CHECKPOINT_PATH: any supported format,
validated against the T5.1.1 layout (and against `config` when given).
"""

from __future__ import annotations

import os
from typing import Any, Dict, Tuple

from gqa_t5.checkpoints import source as source_lib
from gqa_t5.checkpoints.errors import CheckpointError

FORMATS = ("t5x", "orbax", "hf", "mesh-tf")


def _is_msgpack_file(path: str) -> bool:
  try:
    with open(path, "rb") as f:
      first = f.read(1)
  except OSError:
    return False
  # A msgpack map (fixmap 0x80-0x8f, map16 0xde, map32 0xdf); TF's 'checkpoint' file is text.
  return bool(first) and (0x80 <= first[0] <= 0x8f or first[0] in (0xDE, 0xDF))


def detect_format(path: str) -> str:
  """'t5x', 'orbax', 'hf' or 'mesh-tf'; CheckpointError naming the path otherwise."""
  from gqa_t5.checkpoints import hf, mesh_tf, orbax_format
  if not os.path.exists(path) and not os.path.exists(path + ".index"):
    raise CheckpointError(f"checkpoint path {path} does not exist")
  if os.path.isfile(path) and _is_msgpack_file(path):
    return "t5x"
  if os.path.isdir(path):
    for candidate in (os.path.join(path, "checkpoint"),
                      os.path.join(path, "state", "checkpoint")):
      if os.path.isfile(candidate) and _is_msgpack_file(candidate):
        return "t5x"
    if hf.is_hf_dir(path):
      return "hf"
    if orbax_format.is_orbax_dir(path):
      return "orbax"
  if mesh_tf.is_mesh_tf(path):
    return "mesh-tf"
  raise CheckpointError(
      f"cannot detect the checkpoint format of {path}: expected a T5X checkpoint directory "
      "(msgpack 'checkpoint' file), an Orbax checkpoint ('state/_METADATA'), a Hugging Face "
      "directory (config.json + model.safetensors / pytorch_model.bin) or a TensorFlow "
      "checkpoint (.index); pass the format explicitly")


def open_checkpoint(path: str, format: str = "auto", config=None,
                    validate: bool = True) -> source_lib.CheckpointSource:
  """Opens a checkpoint lazily (metadata only) in the given or detected format."""
  if format in (None, "auto"):
    format = detect_format(path)
  if format == "t5x":
    from gqa_t5.checkpoints.t5x_legacy import open_t5x as opener
  elif format == "orbax":
    from gqa_t5.checkpoints.orbax_format import open_orbax as opener
  elif format == "hf":
    from gqa_t5.checkpoints.hf import open_hf as opener
  elif format in ("mesh-tf", "mesh_tf", "tf"):
    from gqa_t5.checkpoints.mesh_tf import open_mesh_tf as opener
  else:
    raise CheckpointError(f"unknown checkpoint format {format!r}; known: "
                          f"{', '.join(FORMATS)} or 'auto'")
  if not os.path.exists(path) and not os.path.exists(path + ".index"):
    raise CheckpointError(f"checkpoint path {path} does not exist")
  return opener(path, config=config, validate=validate)


def load_checkpoint(path: str, format: str = "auto", config=None, dtype=None
                    ) -> Tuple[Dict[str, Any], int, Any]:
  """(params, step, inferred T5Config) of any supported checkpoint, in memory."""
  source = open_checkpoint(path, format=format, config=config)
  return source.read_all(dtype), source.step, source.config


def load_params(path: str, format: str = "auto", config=None, dtype=None) -> Dict[str, Any]:
  """The parameter tree (nested dicts of numpy arrays) of any supported checkpoint.

  With `config`, the tensors must have exactly that config's shapes (e.g. a GQA config needs
  a converted checkpoint); the error names every mismatching tensor.
  """
  params, _, _ = load_checkpoint(path, format=format, config=config, dtype=dtype)
  return params
