"""Mesh TensorFlow T5 checkpoints (the original public T5 / T5.1.1 release): read.

Variables are named like `encoder/block_000/layer_000/SelfAttention/q` ([d_model, heads*d_kv],
already [in, out] as T5X keeps them), `shared/embedding`, `decoder/logits/kernel`,
`.../DenseReluDense/wi_0/kernel`, `.../layer_norm/scale` and, in block 0 of each stack,
`.../SelfAttention/relative_attention_bias` [heads, buckets]. No tensor needs transposing or
rescaling. Adafactor slots (`*_slot_vr`, `*_slot_vc`, `*_slot_v`) are skipped; `global_step`
gives the step. TensorFlow is imported only when such a checkpoint is opened.
"""

from __future__ import annotations

import codecs
import glob
import math
import os
import re
from typing import Dict, Optional

import numpy as np

from gqa_t5.checkpoints import confine
from gqa_t5.checkpoints import source as source_lib
from gqa_t5.checkpoints.errors import CheckpointError
from gqa_t5.checkpoints.lazy import LazyTensor
from gqa_t5.checkpoints.msgpack_codec import dtype_from_name

FORMAT = "mesh-tf"

_ATTENTION = {"q": "query", "k": "key", "v": "value", "o": "out"}
_ENCODER_NORMS = ("pre_attention_layer_norm", "pre_mlp_layer_norm")
_DECODER_NORMS = ("pre_self_attention_layer_norm", "pre_cross_attention_layer_norm",
                  "pre_mlp_layer_norm")
_BLOCK = r"(encoder|decoder)/block_(\d+)/layer_(\d+)"


def is_mesh_tf(path: str) -> bool:
  """A TF checkpoint: a prefix with an `.index` file, or a directory holding one."""
  if os.path.isfile(path + ".index"):
    return True
  return os.path.isdir(path) and bool(glob.glob(os.path.join(path, "*.index")))


def t5x_name(mtf_name: str) -> Optional[str]:
  """The T5X parameter name of a Mesh TF variable; None for variables that are not params."""
  if mtf_name == "global_step" or "_slot_" in mtf_name:
    return None
  if mtf_name == "shared/embedding":
    return "token_embedder/embedding"
  match = re.fullmatch(r"(encoder|decoder)/(?:final_layer_norm|rms_norm)/scale", mtf_name)
  if match:
    return f"{match.group(1)}/{match.group(1)}_norm/scale"
  if mtf_name == "decoder/logits/kernel":
    return "decoder/logits_dense/kernel"
  match = re.fullmatch(_BLOCK + r"/SelfAttention/relative_attention_bias", mtf_name)
  if match:
    stack, block = match.group(1), int(match.group(2))
    if block != 0:
      raise CheckpointError(f"Mesh TF variable {mtf_name!r}: a relative position table per "
                            "layer is not T5's layout (only block 0 holds one)")
    return f"{stack}/relpos_bias/rel_embedding"
  match = re.fullmatch(_BLOCK + r"/(SelfAttention|EncDecAttention)/([qkvo])", mtf_name)
  if match:
    stack, block, _, kind, matrix = match.groups()
    if stack == "encoder":
      layer = "attention"
    else:
      layer = "self_attention" if kind == "SelfAttention" else "encoder_decoder_attention"
    return f"{stack}/layers_{int(block)}/{layer}/{_ATTENTION[matrix]}/kernel"
  match = re.fullmatch(_BLOCK + r"/DenseReluDense/(wi_\d+|wi|wo)/kernel", mtf_name)
  if match:
    stack, block, _, name = match.groups()
    return f"{stack}/layers_{int(block)}/mlp/{name}/kernel"
  match = re.fullmatch(_BLOCK + r"/(?:layer_norm|rms_norm)/scale", mtf_name)
  if match:
    stack, block, sublayer = match.group(1), int(match.group(2)), int(match.group(3))
    norms = _ENCODER_NORMS if stack == "encoder" else _DECODER_NORMS
    if sublayer >= len(norms):
      raise CheckpointError(f"Mesh TF variable {mtf_name!r}: {stack} blocks have "
                            f"{len(norms)} sub-layers")
    return f"{stack}/layers_{block}/{norms[sublayer]}/scale"
  raise CheckpointError(f"Mesh TF variable {mtf_name!r} is not part of a T5 model")


def _numpy_dtype(tf_dtype) -> np.dtype:
  if tf_dtype.name == "bfloat16":
    return dtype_from_name("bfloat16")
  return np.dtype(tf_dtype.as_numpy_dtype)


def _state_file_prefix(directory: str) -> Optional[str]:
  """`model_checkpoint_path` of TensorFlow's text `checkpoint` file in `directory` (None if
  there is none), read without TensorFlow."""
  state = os.path.join(directory, "checkpoint")
  if not os.path.isfile(state):
    return None
  confine.resolve_inside(directory, state, "TensorFlow checkpoint state file")
  try:
    with open(state, encoding="utf-8") as f:
      text = f.read(1 << 20)
  except (OSError, UnicodeDecodeError) as error:
    raise CheckpointError(f"cannot read TensorFlow checkpoint state file {state}: "
                          f"{error}") from error
  match = re.search(r'^model_checkpoint_path:\s*"((?:[^"\\]|\\.)*)"', text, re.M)
  if match is None:
    raise CheckpointError(f"TensorFlow checkpoint state file {state} names no "
                          "model_checkpoint_path")
  return codecs.escape_decode(match.group(1).encode("utf-8"))[0].decode("utf-8", "replace")


def confined_prefix(path: str) -> str:
  """The checkpoint prefix TensorFlow will read for `path` (a directory or a prefix), with its
  index and data files checked to lie inside the checkpoint's folder. The state file's
  `model_checkpoint_path` may be relative or (as TF1's Saver writes it) absolute, but must not
  lead out of the folder, through `..` or a symlink."""
  if os.path.isdir(path):
    root = path
    named = _state_file_prefix(path)
    if named is not None:
      what = f"TensorFlow checkpoint state file {os.path.join(path, 'checkpoint')}: " \
             f"model_checkpoint_path"
      if os.path.isabs(named):
        prefix = confine.resolve_inside(root, named, f"{what} {named!r}")
      else:
        prefix = confine.join_inside(root, named, what)
    else:
      indexes = sorted(glob.glob(os.path.join(glob.escape(path), "*.index")))
      if len(indexes) != 1:
        raise CheckpointError(f"TensorFlow checkpoint directory {path} has no 'checkpoint' "
                              f"state file and {len(indexes)} .index files: pass the prefix "
                              "(e.g. DIR/model.ckpt-1000000)")
      prefix = indexes[0][:-len(".index")]
  else:
    root = os.path.dirname(os.path.abspath(path))
    prefix = path
  for name in [prefix + ".index"] + glob.glob(glob.escape(prefix) + ".data-*"):
    if os.path.lexists(name):
      confine.resolve_inside(root, name, "TensorFlow checkpoint file")
  return prefix


def _data_bytes(prefix: str) -> int:
  return sum(os.path.getsize(f) for f in glob.glob(glob.escape(prefix) + ".data-*"))


def open_mesh_tf(path: str, config=None, validate: bool = True) -> source_lib.CheckpointSource:
  """Opens a Mesh TF checkpoint (directory or prefix) lazily, under T5X names."""
  if not is_mesh_tf(path):
    raise CheckpointError(f"{path} is not a TensorFlow checkpoint (no .index file)")
  prefix = confined_prefix(path)
  import tensorflow as tf  # optional extra ('data'), seconds to import: only for this format
  try:
    reader = tf.train.load_checkpoint(prefix)
    shapes = reader.get_variable_to_shape_map()
    dtypes = reader.get_variable_to_dtype_map()
  except Exception as error:
    raise CheckpointError(f"cannot open TensorFlow checkpoint {path}: {error}") from error
  data_bytes = _data_bytes(prefix)
  for mtf_name in shapes:
    # TF's data files are uncompressed: no variable can hold more bytes than they do.
    itemsize = dtypes[mtf_name].size if dtypes[mtf_name].is_numpy_compatible else 1
    shape = confine.check_shape(list(shapes[mtf_name]), itemsize,
                                f"Mesh TF variable {mtf_name!r} of {path}")
    if math.prod(shape) * itemsize > data_bytes:
      raise CheckpointError(f"Mesh TF variable {mtf_name!r} of {path}: shape {list(shape)} "
                            f"needs {math.prod(shape) * itemsize} bytes, the data files "
                            f"{prefix}.data-* hold {data_bytes}")
  tensors: Dict[str, LazyTensor] = {}
  origin: Dict[str, str] = {}
  step = 0
  for mtf_name in sorted(shapes):
    if mtf_name == "global_step":
      step = int(np.asarray(reader.get_tensor(mtf_name)).reshape(()))
      continue
    name = t5x_name(mtf_name)
    if name is None:
      continue
    if name in tensors:
      raise CheckpointError(f"Mesh TF variables {origin[name]!r} and {mtf_name!r} both map to "
                            f"{name!r}")

    def read(mtf_name=mtf_name):
      try:
        return np.asarray(reader.get_tensor(mtf_name))
      except Exception as error:
        raise CheckpointError(f"cannot read Mesh TF variable {mtf_name!r} from {path}: "
                              f"{error}") from error

    origin[name] = mtf_name
    tensors[name] = LazyTensor(name, tuple(shapes[mtf_name]), _numpy_dtype(dtypes[mtf_name]),
                               read)
  source = source_lib.CheckpointSource(path=path, format=FORMAT, tensors=tensors, step=step)
  return source_lib.finish(source, config=config, validate=validate)
