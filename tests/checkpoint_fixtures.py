"""Shared by the checkpoint tests: tree comparison, writers of test inputs (their config:
tiny_configs.tiny_config("checkpoint", ...))."""

import json
import os
import signal
import struct
import time

import numpy as np

from gqa_t5.checkpoints import hf, lazy
from gqa_t5.checkpoints import tree as tree_lib
from gqa_t5.convert import cli


def assert_trees_equal(a, b):
  """Same leaf names, dtypes and values."""
  fa, fb = tree_lib.flatten(a), tree_lib.flatten(b)
  assert sorted(fa) == sorted(fb)
  for name in fa:
    assert np.asarray(fb[name]).dtype == np.asarray(fa[name]).dtype, name
    assert np.array_equal(fa[name], fb[name]), name


def write_safetensors(path, tensors):
  """A safetensors file (8-byte header length, JSON header, raw data) without the package."""
  codes = {"float32": "F32", "float16": "F16", "int32": "I32", "int64": "I64"}
  header, blobs, offset = {}, [], 0
  for name, value in tensors.items():
    data = np.ascontiguousarray(value).tobytes()
    header[name] = {"dtype": codes[value.dtype.name], "shape": list(value.shape),
                    "data_offsets": [offset, offset + len(data)]}
    blobs.append(data)
    offset += len(data)
  raw = json.dumps(header).encode()
  with open(path, "wb") as f:
    f.write(struct.pack("<Q", len(raw)) + raw + b"".join(blobs))


def write_hf(directory, config, params):
  """A Hugging Face T5 directory (config.json + model.safetensors) holding `params`."""
  os.makedirs(directory)
  flat = tree_lib.flatten(params)
  tensors = {theirs: np.ascontiguousarray(flat[ours].T if transpose else flat[ours])
             for ours, (theirs, transpose) in hf.hf_name_map(config).items()}
  write_safetensors(os.path.join(directory, hf.SAFETENSORS), tensors)
  hf_config = dict(vocab_size=config.vocab_size, d_model=config.emb_dim,
                   num_heads=config.num_heads, d_kv=config.head_dim, d_ff=config.mlp_dim,
                   num_layers=config.num_encoder_layers,
                   num_decoder_layers=config.num_decoder_layers, feed_forward_proj="gated-gelu",
                   tie_word_embeddings=False)
  with open(os.path.join(directory, hf.CONFIG_FILE), "w") as f:
    json.dump(hf_config, f)


def slow_convert(argv, delay):
  """`gqa-t5 convert argv` in which every tensor read prints 'read NAME' and takes `delay` s
  longer: the signal tests interrupt it mid-write. Returns the exit status."""
  signal.signal(signal.SIGINT, signal.default_int_handler)  # even if the parent ignores it
  original = lazy.LazyTensor.read

  def read(self):
    print(f"read {self.name}", flush=True)
    time.sleep(delay)
    return original(self)

  lazy.LazyTensor.read = read
  return cli.main(argv)


def entries(directory):
  """Everything in a directory, hidden temporary directories included."""
  return sorted(os.listdir(directory))
