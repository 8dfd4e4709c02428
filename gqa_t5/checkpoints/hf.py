"""Hugging Face T5 checkpoints (T5.1.1, Flan-T5, mT5): read.

A directory with `config.json` and `model.safetensors` (or a sharded
`model.safetensors.index.json`), or `pytorch_model.bin` (needs torch). HF names map onto the
T5X tree; HF stores `nn.Linear` weights as [out, in], so every kernel is transposed, and the
relative position table [buckets, heads] becomes T5X's [heads, buckets]. The weight files
themselves are read by hf_files.py.
"""

from __future__ import annotations

import json
import os
from typing import Any, Dict, Mapping, Optional, Tuple

import numpy as np

from gqa_t5.checkpoints import confine
from gqa_t5.checkpoints import hf_files
from gqa_t5.checkpoints import source as source_lib
from gqa_t5.checkpoints.errors import CheckpointError
from gqa_t5.checkpoints.lazy import LazyTensor
from gqa_t5.model.config import T5Config

FORMAT = "hf"
CONFIG_FILE = "config.json"
SAFETENSORS = hf_files.SAFETENSORS
SAFETENSORS_INDEX = hf_files.SAFETENSORS_INDEX
TORCH_BIN = hf_files.TORCH_BIN
TORCH_BIN_INDEX = hf_files.TORCH_BIN_INDEX

  
# HF's feed_forward_proj -> T5X's mlp_activations. HF's gated GELU is "gelu_new" (tanh
# approximation), which is what T5X's 'gelu' computes.
_ACTIVATIONS = {
    "relu": ("relu",),
    "gated-gelu": ("gelu", "linear"),
    "gated-gelu_new": ("gelu", "linear"),
    "gated-relu": ("relu", "linear"),
    "gated-silu": ("silu", "linear"),
}


def is_hf_dir(path: str) -> bool:
  return (os.path.isdir(path) and os.path.isfile(os.path.join(path, CONFIG_FILE)) and
          any(os.path.exists(os.path.join(path, f))
              for f in (SAFETENSORS, SAFETENSORS_INDEX, TORCH_BIN, TORCH_BIN_INDEX)))


def _config_dict(hf_config: Any) -> Dict[str, Any]:
  if isinstance(hf_config, Mapping):
    return dict(hf_config)
  if hasattr(hf_config, "to_dict"):
    return hf_config.to_dict()
  raise TypeError(f"expected a dict or transformers config, got {type(hf_config).__name__}")


def scales_decoder_output(hf_config: Any) -> bool:
  """Whether HF multiplies the decoder output by d_model**-0.5 before `lm_head`.

  That is original T5 (tied embeddings), and what T5X's `logits_via_embedding` does. Older
  configs say it with `tie_word_embeddings` (T5.1.1: false); transformers >= 5 always ties and
  says it with `scale_decoder_outputs`.
  """
  cfg = _config_dict(hf_config)
  if cfg.get("scale_decoder_outputs") is not None:
    return bool(cfg["scale_decoder_outputs"])
  return bool(cfg.get("tie_word_embeddings", True))


def hf_config_to_t5config(hf_config: Any, **overrides) -> T5Config:
  """T5Config of an HF `T5Config` (object or config.json dict); `overrides` win.

  A scaled decoder output maps to `logits_via_embedding=True`. When such a checkpoint also
  stores a separate `lm_head.weight`, `open_hf` turns it into an unscaled `logits_dense`
  kernel (scale folded in) and sets `logits_via_embedding=False`; when an unscaled one stores
  none (transformers >= 5 ties it), `logits_dense` is the transposed embedding.
  """
  cfg = _config_dict(hf_config)
  proj = cfg.get("feed_forward_proj", "relu")
  if proj not in _ACTIVATIONS:
    raise CheckpointError(f"HF config feed_forward_proj={proj!r} is not supported; "
                          f"supported: {sorted(_ACTIVATIONS)}")
  for field in ("vocab_size", "d_model", "num_heads", "d_kv", "d_ff", "num_layers"):
    if field not in cfg:
      raise CheckpointError(f"HF config has no {field!r}")
  fields = dict(
      vocab_size=cfg["vocab_size"], emb_dim=cfg["d_model"], num_heads=cfg["num_heads"],
      head_dim=cfg["d_kv"], mlp_dim=cfg["d_ff"], num_encoder_layers=cfg["num_layers"],
      num_decoder_layers=cfg.get("num_decoder_layers") or cfg["num_layers"],
      mlp_activations=_ACTIVATIONS[proj], dropout_rate=float(cfg.get("dropout_rate", 0.0)),
      logits_via_embedding=scales_decoder_output(cfg),
      relative_attention_num_buckets=cfg.get("relative_attention_num_buckets", 32),
      relative_attention_max_distance=cfg.get("relative_attention_max_distance", 128))
  fields.update(overrides)
  try:
    return T5Config(**fields)
  except ValueError as error:
    raise CheckpointError(f"HF config gives an invalid T5Config: {error}") from error


# ------------------------------------------------------------------ name mapping

def hf_name_map(config: T5Config) -> Dict[str, Tuple[str, bool]]:
  """{T5X name: (HF name, transpose)} for a T5Config."""
  names: Dict[str, Tuple[str, bool]] = {
      "token_embedder/embedding": ("shared.weight", False),
      "encoder/relpos_bias/rel_embedding":
          ("encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight", True),
      "decoder/relpos_bias/rel_embedding":
          ("decoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight", True),
      "encoder/encoder_norm/scale": ("encoder.final_layer_norm.weight", False),
      "decoder/decoder_norm/scale": ("decoder.final_layer_norm.weight", False),
  }
  if not config.logits_via_embedding:
    names["decoder/logits_dense/kernel"] = ("lm_head.weight", True)
  mlp_names = (["wi"] if len(config.mlp_activations) == 1
               else [f"wi_{i}" for i in range(len(config.mlp_activations))]) + ["wo"]

  def attention(t5x: str, hf: str):
    for ours, theirs in (("query", "q"), ("key", "k"), ("value", "v"), ("out", "o")):
      names[f"{t5x}/{ours}/kernel"] = (f"{hf}.{theirs}.weight", True)

  def mlp(t5x: str, hf: str):
    for name in mlp_names:
      names[f"{t5x}/mlp/{name}/kernel"] = (f"{hf}.DenseReluDense.{name}.weight", True)

  for i in range(config.num_encoder_layers):
    t5x, hf = f"encoder/layers_{i}", f"encoder.block.{i}.layer"
    attention(f"{t5x}/attention", f"{hf}.0.SelfAttention")
    names[f"{t5x}/pre_attention_layer_norm/scale"] = (f"{hf}.0.layer_norm.weight", False)
    mlp(t5x, f"{hf}.1")
    names[f"{t5x}/pre_mlp_layer_norm/scale"] = (f"{hf}.1.layer_norm.weight", False)
  for i in range(config.num_decoder_layers):
    t5x, hf = f"decoder/layers_{i}", f"decoder.block.{i}.layer"
    attention(f"{t5x}/self_attention", f"{hf}.0.SelfAttention")
    names[f"{t5x}/pre_self_attention_layer_norm/scale"] = (f"{hf}.0.layer_norm.weight", False)
    attention(f"{t5x}/encoder_decoder_attention", f"{hf}.1.EncDecAttention")
    names[f"{t5x}/pre_cross_attention_layer_norm/scale"] = (f"{hf}.1.layer_norm.weight", False)
    mlp(t5x, f"{hf}.2")
    names[f"{t5x}/pre_mlp_layer_norm/scale"] = (f"{hf}.2.layer_norm.weight", False)
  return names


# Copies of `shared` that HF may store besides it (tied; we keep one embedding).
_TIED_COPIES = ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight")


def _mapped(name: str, hf_name: str, transpose: bool, shape, dtype, read) -> LazyTensor:
  shape = tuple(reversed(shape)) if transpose else tuple(shape)
  if transpose:
    return LazyTensor(name, shape, dtype, lambda: np.ascontiguousarray(read().T))
  return LazyTensor(name, shape, dtype, lambda: np.array(read()))


def open_hf(path: str, config: Optional[T5Config] = None, validate: bool = True
            ) -> source_lib.CheckpointSource:
  """Opens an HF T5 checkpoint directory lazily, under T5X names."""
  if not os.path.isdir(path):
    raise CheckpointError(f"HF checkpoint path {path} is not a directory")
  root = confine.hf_root(path)  # every file read must lie inside it (symlinks resolved)
  config_path = os.path.join(path, CONFIG_FILE)
  if os.path.lexists(config_path):
    confine.resolve_inside(root, config_path, f"HF {CONFIG_FILE}")
  try:
    with open(config_path) as f:
      hf_config = json.load(f)
  except FileNotFoundError:
    raise CheckpointError(f"HF checkpoint {path} has no {CONFIG_FILE}") from None
  except (OSError, ValueError) as error:
    raise CheckpointError(f"cannot parse {config_path}: {error}") from error
  raw = hf_files.raw_tensors(path, root)
  has_lm_head = "lm_head.weight" in raw
  scale = scales_decoder_output(hf_config)
  if config is None:
    config = hf_config_to_t5config(hf_config, logits_via_embedding=scale and not has_lm_head)
  names = hf_name_map(config)
  fold_scale = None
  if not config.logits_via_embedding and not has_lm_head:
    names["decoder/logits_dense/kernel"] = ("shared.weight", True)  # tied, unscaled
  elif not config.logits_via_embedding and scale:
    fold_scale = config.emb_dim ** -0.5  # scaled untied head: fold the scale into the kernel
  wanted = {hf for hf, _ in names.values()} | {"lm_head.weight"}
  missing = [f"{hf!r} (for {ours!r})" for ours, (hf, _) in names.items() if hf not in raw]
  extra = sorted(n for n in raw if n not in wanted and n not in _TIED_COPIES)
  if missing or extra:
    parts = []
    if missing:
      parts.append("missing tensors: " + ", ".join(missing[:10]) +
                   (f" and {len(missing) - 10} more" if len(missing) > 10 else ""))
    if extra:
      parts.append("unexpected tensors: " + ", ".join(repr(n) for n in extra[:10]) +
                   (f" and {len(extra) - 10} more" if len(extra) > 10 else ""))
    raise CheckpointError(f"HF checkpoint {path} does not match its {CONFIG_FILE}: "
                          + "; ".join(parts))
  tensors = {ours: _mapped(ours, hf, transpose, *raw[hf])
             for ours, (hf, transpose) in names.items()}
  if fold_scale is not None:
    head = tensors["decoder/logits_dense/kernel"]
    tensors[head.name] = LazyTensor(
        head.name, head.shape, head.dtype,
        lambda: (head.read().astype(np.float32) * fold_scale).astype(head.dtype))
  source = source_lib.CheckpointSource(path=path, format=FORMAT, tensors=tensors, step=0,
                                       config=config)
  return source_lib.finish(source, config=config, validate=validate)
