"""What a preset trains and times: the fine-tuned model variants (`FinetuneVariant`: K,
conversion method, alpha, seed), the paper-shape decode timings (`PaperTiming`), the small
T5.1.1-style `T5Config`s the presets are built from (`small_model`, `config_dict` for stage keys
and results.json), and the config and model a stage runs (`variant_config`, `make_model`)."""

from __future__ import annotations

import dataclasses
from typing import Dict, Optional, Tuple

from gqa_t5 import models
from gqa_t5.model import grouping
from gqa_t5.model import network
from gqa_t5.model import sizes
from gqa_t5.model.config import T5Config

# The vocabulary size a preset's model is written with; the run replaces it by the demo
# vocabulary's size rounded up to 128 (or the preset's own `vocab_size`).
PLACEHOLDER_VOCAB = 8192


def small_model(emb_dim: int, num_heads: int, head_dim: int, mlp_dim: int, layers: int,
                dtype: str = "float32") -> T5Config:
  """A T5.1.1-style multi-head model of these dimensions (equal stack depths)."""
  return T5Config(vocab_size=PLACEHOLDER_VOCAB, dtype=dtype, emb_dim=emb_dim,
                  num_heads=num_heads, head_dim=head_dim, mlp_dim=mlp_dim,
                  num_encoder_layers=layers, num_decoder_layers=layers, dropout_rate=0.0)


@dataclasses.dataclass(frozen=True)
class PaperTiming:
  """Decode timing at a named T5.1.1 size, random weights (Table 1's T_infer and Fig. 6)."""
  size: str                         # a `gqa_t5.model.sizes` name
  kv_heads: Tuple[int, ...]
  batch: int
  input_length: int = 2048
  output_length: int = 512
  repeats: int = 2
  dtype: str = "bfloat16"
  shrink: bool = False              # smoke runs: the size's head count, everything else tiny

  def config(self) -> T5Config:
    config = sizes.t5_1_1(self.size, dtype=self.dtype, dropout_rate=0.0)
    if self.shrink:
      config = config.replace(emb_dim=32, head_dim=2, mlp_dim=32, num_encoder_layers=1,
                              num_decoder_layers=1)
    return config


@dataclasses.dataclass(frozen=True)
class FinetuneVariant:
  """One fine-tuned model: K key/value heads (K = N: MHA), conversion method, alpha, seed."""
  kv_heads: int
  method: str = "mean"
  alpha: float = 0.0
  seed: int = 0

  def attention_name(self, num_heads: int) -> str:
    return grouping.kv_label(self.kv_heads, num_heads)

  def label(self, num_heads: int) -> str:
    """E.g. 'GQA-2 (alpha 0.05)', 'MQA first (alpha 0.05)', 'MHA'."""
    name = self.attention_name(num_heads)
    if self.kv_heads == num_heads:
      text = name
    else:
      method = "" if self.method == "mean" else f" {self.method}"
      text = f"{name}{method} (alpha {self.alpha:g})"
    return text + (f" seed {self.seed}" if self.seed else "")

  def key(self, num_heads: int) -> str:
    """A file-name-safe identifier, e.g. 'gqa2-mean-a0.05-s0'."""
    if self.kv_heads == num_heads:
      return f"mha-s{self.seed}"
    name = grouping.kv_name(self.kv_heads, num_heads)
    return f"{name}-{self.method}-a{self.alpha:g}-s{self.seed}"


def config_dict(config: T5Config) -> Dict:
  """A T5Config as plain JSON (the dtype by name), for stage keys and results.json."""
  out = dataclasses.asdict(config)
  dtype = out["dtype"]
  out["dtype"] = dtype if isinstance(dtype, str) else getattr(dtype, "__name__", str(dtype))
  out["mlp_activations"] = list(out["mlp_activations"])
  return out


def variant_config(base: T5Config, vocab_size: int, kv_heads: Optional[int],
                   dropout_rate: float = 0.0) -> T5Config:
  """`base` with the run's vocabulary, K key/value heads (None or N: MHA) and dropout."""
  k = None if kv_heads in (None, base.num_heads) else kv_heads
  return base.replace(vocab_size=vocab_size, num_kv_heads=k, num_cross_kv_heads=None,
                      dropout_rate=dropout_rate)


def make_model(config: T5Config, vocabulary=None) -> models.EncoderDecoderModel:
  """The model every stage trains or scores: T5.1.1's z-loss (gin/t5_1_1/base.gin), where the
  class defaults to t5x's 0.0."""
  return models.EncoderDecoderModel(network.Transformer(config), input_vocabulary=vocabulary,
                                    output_vocabulary=vocabulary, z_loss=1e-4)
