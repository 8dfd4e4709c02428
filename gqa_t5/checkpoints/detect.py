"""Which format a checkpoint path is in, and one entry point to read any of them.

`load_params(path)` is what training calls for INITIAL_CHECKPOINT_PATH: any supported format,
validated against the T5.1.1 layout (and against `config` when given).
"""

from __future__ import annotations

import os
from typing import Any, Dict, List, Tuple

from gqa_t5.checkpoints import confine
from gqa_t5.checkpoints import hf, mesh_tf, orbax_format, t5x_legacy
from gqa_t5.checkpoints import source as source_lib
from gqa_t5.checkpoints.errors import CheckpointError

FORMATS = ("t5x", "orbax", "hf", "mesh-tf")
_TF_STATE_START = b"model_checkpoint_path"
_OPENERS = {"t5x": t5x_legacy.open_t5x, "orbax": orbax_format.open_orbax, "hf": hf.open_hf,
            "mesh-tf": mesh_tf.open_mesh_tf, "mesh_tf": mesh_tf.open_mesh_tf,
            "tf": mesh_tf.open_mesh_tf}


def _is_msgpack_file(path: str) -> bool:
  try:
    with open(path, "rb") as f:
      first = f.read(1)
  except OSError:
    return False
  # A msgpack map (fixmap 0x80-0x8f, map16 0xde, map32 0xdf); TF's 'checkpoint' file is text.
  return bool(first) and (0x80 <= first[0] <= 0x8f or first[0] in (0xDE, 0xDF))


def _is_tf_state_file(path: str) -> bool:
  try:
    with open(path, "rb") as f:
      return f.read(len(_TF_STATE_START)) == _TF_STATE_START
  except OSError:
    return False


def _damaged_t5x_file(path: str) -> str:
  """The `checkpoint` file of a path that looks like T5X but does not read as msgpack ('')."""
  if os.path.isfile(path):
    candidates = [path] if os.path.basename(path) == t5x_legacy.CHECKPOINT_FILE else []
  else:
    candidates = [os.path.join(path, t5x_legacy.CHECKPOINT_FILE),
                  os.path.join(path, "state", t5x_legacy.CHECKPOINT_FILE)]
  for candidate in candidates:
    # TensorFlow's text 'checkpoint' file (a Mesh TF directory) is no damaged T5X file.
    if os.path.isfile(candidate) and not _is_tf_state_file(candidate):
      return candidate
  return ""


def _describe_damage(ckpt_file: str) -> str:
  try:
    with open(ckpt_file, "rb") as f:
      head = f.read(16)
  except OSError as error:
    return f"cannot be read ({error})"
  if not head:
    return "is empty (0 bytes)"
  return (f"is not msgpack ({os.path.getsize(ckpt_file)} bytes, starting {head!r}; a T5X "
          "checkpoint file starts with a msgpack map)")


def _t5x_checkpoint_steps(path: str) -> List[int]:
  """The steps of the `checkpoint_<step>/` folders in a directory (T5X's MODEL_DIR layout)."""
  if not os.path.isdir(path):
    return []
  prefix = "checkpoint_"
  return sorted(int(name[len(prefix):]) for name in os.listdir(path)
                if name.startswith(prefix) and name[len(prefix):].isdigit()
                and os.path.isdir(os.path.join(path, name)))


def detect_format(path: str) -> str:
  """'t5x', 'orbax', 'hf' or 'mesh-tf'; CheckpointError naming the path otherwise."""
  if not os.path.exists(path) and not os.path.exists(path + ".index"):
    raise CheckpointError(f"checkpoint path {path} does not exist")
  if os.path.isfile(path) and _is_msgpack_file(path):
    return "t5x"
  if os.path.isdir(path):
    for candidate in (os.path.join(path, "checkpoint"),
                      os.path.join(path, "state", "checkpoint")):
      if os.path.lexists(candidate):  # not even sniffed if it leads out of the checkpoint
        confine.resolve_inside(path, candidate, "checkpoint file")
      if os.path.isfile(candidate) and _is_msgpack_file(candidate):
        return "t5x"
    if hf.is_hf_dir(path):
      return "hf"
    if orbax_format.is_orbax_dir(path):
      return "orbax"
  if mesh_tf.is_mesh_tf(path):
    return "mesh-tf"
  damaged = _damaged_t5x_file(path)
  if damaged:  # a 'checkpoint' file and no other format: a T5X checkpoint whose file is broken
    raise CheckpointError(f"damaged T5X checkpoint {path}: its checkpoint file {damaged} "
                          f"{_describe_damage(damaged)}")
  steps = _t5x_checkpoint_steps(path)
  if steps:  # T5X's MODEL_DIR, given where one of its checkpoints is expected
    latest = os.path.join(path, f"checkpoint_{steps[-1]}")
    raise CheckpointError(
        f"{path} is a T5X model directory holding {len(steps)} checkpoint(s) (steps "
        f"{'..., ' if len(steps) > 3 else ''}{', '.join(map(str, steps[-3:]))}), not a "
        f"checkpoint: pass one of them, e.g. the latest, {latest}")
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
  opener = _OPENERS.get(format)
  if opener is None:
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
