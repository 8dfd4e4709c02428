"""The network's configuration: T5X's `T5Config` field names plus key/value head counts.

A T5X user's gin overrides (`network.T5Config.emb_dim = 1024`, ...) carry over unchanged;
`num_kv_heads` and `num_cross_kv_heads` are the only additions the paper needs.
"""

from __future__ import annotations

import dataclasses
import numbers
from typing import Any, Optional, Sequence

import jax.numpy as jnp

from gqa_t5.model import grouping

_KNOWN_ACTIVATIONS = ("relu", "gelu", "linear", "silu", "swish", "gelu_new", "tanh")
_INT_FIELDS = ("vocab_size", "emb_dim", "num_heads", "num_encoder_layers", "num_decoder_layers",
               "head_dim", "mlp_dim", "num_kv_heads", "num_cross_kv_heads",
               "relative_attention_num_buckets", "relative_attention_max_distance")


@dataclasses.dataclass(frozen=True)
class T5Config:
  """Hyper-parameters of a T5.1.1 encoder-decoder with grouped decoder attention.

  Attributes (T5X names first):
    vocab_size: size of the (padded) vocabulary.
    dtype: activation dtype (parameters are always float32, as in T5X).
    emb_dim: model width D.
    num_heads: query heads N of every attention layer.
    num_encoder_layers / num_decoder_layers: stack depths.
    head_dim: width H of one head.
    mlp_dim: hidden width of the MLP.
    mlp_activations: ('gelu', 'linear') is T5.1.1's gated GELU.
    dropout_rate: dropout everywhere dropout applies.
    logits_via_embedding: tie the output layer to the input embedding (T5.1.1: False).
    float32_attention_logits: compute attention logits in float32 whatever `dtype` is.
    num_kv_heads: key/value heads K of the decoder self-attention (None: = num_heads, MHA).
    num_cross_kv_heads: key/value heads of the encoder-decoder attention (None: = num_kv_heads).
    relative_attention_num_buckets / relative_attention_max_distance: T5's bucketing.
    scan_layers: run each stack as one `nn.scan` over stacked layer parameters (T5X's
      `scan_layers`; parameters then live under `layers` with a leading layer axis).
    remat_policy: 'none', 'full' or 'minimal' (save matmul outputs) rematerialisation per layer.
  """

  vocab_size: int
  dtype: Any = jnp.float32
  emb_dim: int = 512
  num_heads: int = 8
  num_encoder_layers: int = 6
  num_decoder_layers: int = 6
  head_dim: int = 64
  mlp_dim: int = 2048
  mlp_activations: Sequence[str] = ("gelu", "linear")
  dropout_rate: float = 0.1
  logits_via_embedding: bool = False
  float32_attention_logits: bool = False
  num_kv_heads: Optional[int] = None
  num_cross_kv_heads: Optional[int] = None
  relative_attention_num_buckets: int = 32
  relative_attention_max_distance: int = 128
  scan_layers: bool = False
  remat_policy: str = "none"

  def __post_init__(self):
    # numpy integers (e.g. read from an array) become ints: the config stays hashable and prints
    # plainly. Other types are left for `validate` to refuse by name.
    for name in _INT_FIELDS:
      value = getattr(self, name)
      if isinstance(value, numbers.Integral) and not isinstance(value, (bool, int)):
        object.__setattr__(self, name, int(value))
    if isinstance(self.mlp_activations, str):  # tuple('gelu') would be ('g', 'e', 'l', 'u')
      raise ValueError(f"T5Config.mlp_activations must be a sequence of activation names, got the "
                       f"string {self.mlp_activations!r}; write ({self.mlp_activations!r},)")
    # Tuples keep the config hashable (it is a static argument of jitted functions).
    try:
      object.__setattr__(self, "mlp_activations", tuple(self.mlp_activations))
    except TypeError:
      raise ValueError(f"T5Config.mlp_activations must be a sequence of activation names, got "
                       f"{self.mlp_activations!r}") from None
    validate(self)

  @property
  def self_attention_kv_heads(self) -> int:
    return self.num_heads if self.num_kv_heads is None else self.num_kv_heads

  @property
  def cross_attention_kv_heads(self) -> int:
    if self.num_cross_kv_heads is not None:
      return self.num_cross_kv_heads
    return self.self_attention_kv_heads

  def replace(self, **changes) -> "T5Config":
    return dataclasses.replace(self, **changes)


def _require_positive(name: str, value) -> None:
  if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
    raise ValueError(f"T5Config.{name} must be a positive integer, got {value!r}")


def validate(config: T5Config) -> None:
  """Raises ValueError naming the field and value of any inconsistent setting."""
  # Zero layers are refused too: a stack without layers has no cache to decode with.
  for name in ("vocab_size", "emb_dim", "num_heads", "head_dim", "mlp_dim", "num_encoder_layers",
               "num_decoder_layers", "relative_attention_num_buckets",
               "relative_attention_max_distance"):
    _require_positive(name, getattr(config, name))
  for name in ("num_kv_heads", "num_cross_kv_heads"):
    value = getattr(config, name)
    if value is None:
      continue
    _require_positive(name, value)
    try:
      grouping.group_size(config.num_heads, value)
    except ValueError:
      raise ValueError(
          f"T5Config.{name}={value} does not divide num_heads={config.num_heads}: each group of "
          f"query heads shares one key/value head; use one of "
          f"{grouping.valid_kv_heads(config.num_heads)}") from None
  if not isinstance(config.dropout_rate, numbers.Real) or not 0.0 <= config.dropout_rate < 1.0:
    raise ValueError(f"T5Config.dropout_rate must be in [0, 1), got {config.dropout_rate!r}")
  if not config.mlp_activations:
    raise ValueError("T5Config.mlp_activations must name at least one activation")
  for act in config.mlp_activations:
    if act not in _KNOWN_ACTIVATIONS:
      raise ValueError(f"T5Config.mlp_activations has unknown activation {act!r}; "
                       f"known: {_KNOWN_ACTIVATIONS}")
  if config.remat_policy not in ("none", "full", "minimal"):
    raise ValueError(f"T5Config.remat_policy must be 'none', 'full' or 'minimal', "
                     f"got {config.remat_policy!r}")
