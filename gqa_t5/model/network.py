"""The T5.1.1 encoder-decoder with grouped-query decoder attention, T5X's module interface.

`Transformer` has the methods and arguments T5X's `EncoderDecoderModel` calls (`__call__`,
`encode`, `decode` with `decode=True` and `max_decode_length`, `enable_dropout`, a mutable `cache`
collection) and T5X's T5.1.1 parameter tree, so the module can be handed to t5x as it is.
The encoder's attention is always multi-head; the decoder's self- and cross-attention use
`config.self_attention_kv_heads` and `config.cross_attention_kv_heads` key/value heads.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
from flax import linen as nn
from flax.linen import partitioning as nn_partitioning

from gqa_t5.model import masks
from gqa_t5.model.attention import GroupedAttention
from gqa_t5.model.config import T5Config
from gqa_t5.model.layers import Dense, Embed, MlpBlock, RelativePositionBiases, RMSNorm


def _hidden(x: jnp.ndarray) -> jnp.ndarray:
  """[B, T, D] activations: batch over 'data', model dim whole (T5X's 1-D activation
  partitioning); a no-op outside a partitioner's rules."""
  return nn.with_logical_constraint(x, ("batch", "length", "embed"))


def _dropout(config: T5Config):
  # T5X shares each dropout mask across the sequence dimension.
  return nn.Dropout(config.dropout_rate, broadcast_dims=(-2,))


def _relative_bias_module(config: T5Config) -> RelativePositionBiases:
  return RelativePositionBiases(config.relative_attention_num_buckets,
                                config.relative_attention_max_distance, config.num_heads,
                                config.dtype, name="relpos_bias")


def _maybe_remat(layer_cls, config: T5Config, num_args: int = 0):
  if config.remat_policy == "none":
    return layer_cls
  policy = None
  if config.remat_policy == "minimal":
    policy = jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims
  # Argument 0 is the module itself; the boolean flags after the arrays are static. A scanned
  # stack passes only the first `num_args` arguments.
  static = tuple(i for i in layer_cls.STATIC_ARGNUMS if not num_args or i <= num_args)
  return nn.remat(layer_cls, policy=policy, static_argnums=static)


def _stack(layer_cls, config: T5Config, num_layers: int, name: str, num_broadcast_args: int,
           remat: bool = True):
  """One `nn.scan` over `num_layers` copies of a layer (T5X's `scan_layers`).

  Parameters get a leading-but-one 'layers' axis (T5X's param_scan_axis = 1), e.g.
  `encoder/layers/attention/query/kernel` [emb, layers, heads*head_dim]; decoding caches a
  leading one (T5X's scanned cache layout, whose loops then take cache_offset = 1), e.g.
  `decoder/layers/self_attention/cached_key` [layers, B, K, S, H], `cache_index` [layers].
  """
  target = _maybe_remat(layer_cls, config, num_broadcast_args + 1) if remat else layer_cls
  scanned = nn_partitioning.scan_with_axes(
      target, variable_axes={"params": 1, "cache": 0},
      split_rngs={"params": True, "dropout": True},
      in_axes=(nn.broadcast,) * num_broadcast_args, length=num_layers, axis_name="layers")
  return scanned(config, scanned=True, name=name)


def _attention(config: T5Config, num_kv_heads: int, name: str, **kwargs) -> GroupedAttention:
  return GroupedAttention(
      emb_dim=config.emb_dim, num_heads=config.num_heads, num_kv_heads=num_kv_heads,
      head_dim=config.head_dim, dtype=config.dtype, dropout_rate=config.dropout_rate,
      float32_logits=config.float32_attention_logits, name=name, **kwargs)


class EncoderLayer(nn.Module):
  config: T5Config
  scanned: bool = False  # inside nn.scan: return (carry, None)
  STATIC_ARGNUMS = (4,)

  @nn.compact
  def __call__(self, inputs, mask, bias, deterministic: bool = True):
    cfg = self.config
    x = RMSNorm(dtype=cfg.dtype, name="pre_attention_layer_norm")(inputs)
    x = _attention(cfg, cfg.num_heads, "attention")(x, x, mask=mask, bias=bias,
                                                    deterministic=deterministic)
    x = _dropout(cfg)(x, deterministic=deterministic) + inputs
    y = RMSNorm(dtype=cfg.dtype, name="pre_mlp_layer_norm")(x)
    y = MlpBlock(cfg.mlp_dim, cfg.mlp_activations, cfg.dropout_rate, cfg.dtype, name="mlp")(
        y, deterministic)
    y = _hidden(_dropout(cfg)(y, deterministic=deterministic) + x)
    return (y, None) if self.scanned else y


class DecoderLayer(nn.Module):
  """Self-attention, cross-attention, MLP. Positional arguments only (`nn.scan` passes them)."""

  config: T5Config
  scanned: bool = False  # inside nn.scan: return (carry, None)
  STATIC_ARGNUMS = (6,)  # deterministic; rematerialised (training) calls pass no decode flags

  @nn.compact
  def __call__(self, inputs, encoded, self_mask, cross_mask, bias, deterministic: bool = True,
               decode: bool = False, prefill: bool = False, prefill_lengths=None,
               position_bias=None, cross_kv_cached: bool = False):
    cfg = self.config
    cached = dict(deterministic=deterministic, decode=decode, prefill=prefill)
    x = RMSNorm(dtype=cfg.dtype, name="pre_self_attention_layer_norm")(inputs)
    x = _attention(cfg, cfg.self_attention_kv_heads, "self_attention",
                   kv_kernel_axis="grouped_kv")(
                       x, x, mask=self_mask, bias=bias, prefill_lengths=prefill_lengths,
                       position_bias=position_bias, **cached)
    x = _dropout(cfg)(x, deterministic=deterministic) + inputs
    y = RMSNorm(dtype=cfg.dtype, name="pre_cross_attention_layer_norm")(x)
    y = _attention(cfg, cfg.cross_attention_kv_heads, "encoder_decoder_attention",
                   kv_kernel_axis="grouped_kv", cross_attention=True)(
                       y, encoded, mask=cross_mask, cross_kv_cached=cross_kv_cached, **cached)
    y = _dropout(cfg)(y, deterministic=deterministic) + x
    z = RMSNorm(dtype=cfg.dtype, name="pre_mlp_layer_norm")(y)
    z = MlpBlock(cfg.mlp_dim, cfg.mlp_activations, cfg.dropout_rate, cfg.dtype, name="mlp")(
        z, deterministic)
    z = _hidden(_dropout(cfg)(z, deterministic=deterministic) + y)
    return (z, None) if self.scanned else z


class Encoder(nn.Module):
  config: T5Config
  shared_embedding: nn.Module

  @nn.compact
  def __call__(self, tokens, mask, deterministic: bool = True):
    cfg = self.config
    x = self.shared_embedding(tokens.astype(jnp.int32))                 # [B, S, D]
    x = _hidden(_dropout(cfg)(x, deterministic=deterministic).astype(cfg.dtype))
    positions = jnp.arange(tokens.shape[1])
    bias = _relative_bias_module(cfg)(positions, positions, bidirectional=True)  # [1, N, S, S]
    if cfg.scan_layers:
      x, _ = _stack(EncoderLayer, cfg, cfg.num_encoder_layers, "layers", 3)(
          x, mask, bias, deterministic)
    else:
      layer_cls = _maybe_remat(EncoderLayer, cfg)
      for i in range(cfg.num_encoder_layers):
        x = layer_cls(cfg, name=f"layers_{i}")(x, mask, bias, deterministic)
    x = RMSNorm(dtype=cfg.dtype, name="encoder_norm")(x)
    return _dropout(cfg)(x, deterministic=deterministic)


class Decoder(nn.Module):
  config: T5Config
  shared_embedding: nn.Module

  @nn.compact
  def __call__(self, encoded, tokens, self_mask, cross_mask, deterministic: bool = True,
               decode: bool = False, prefill: bool = False, prefill_lengths=None,
               cross_kv_cached: bool = False):
    cfg = self.config
    y = self.shared_embedding(tokens.astype(jnp.int32))                 # [B, T, D]
    y = _hidden(_dropout(cfg)(y, deterministic=deterministic).astype(cfg.dtype))
    relpos = _relative_bias_module(cfg)
    bias = None
    if not decode:
      positions = jnp.arange(tokens.shape[1])
      bias = relpos(positions, positions, bidirectional=False)          # [1, N, T, T]
    # Layer arguments, positional because nn.scan passes them so. Rematerialised (training)
    # calls stop at `deterministic`: decoding stores nothing for a backward pass.
    args = (encoded, self_mask, cross_mask, bias, deterministic)
    cached = decode or prefill
    if cached:
      # A cached step computes only its own bias rows, from the table: [N, buckets].
      args += (decode, prefill, prefill_lengths, relpos.table(bidirectional=False),
               cross_kv_cached)
    if cfg.scan_layers:
      stack = _stack(DecoderLayer, cfg, cfg.num_decoder_layers, "layers",
                     num_broadcast_args=len(args), remat=not cached)
      y, _ = stack(y, *args)
    else:
      layer_cls = DecoderLayer if cached else _maybe_remat(DecoderLayer, cfg)
      for i in range(cfg.num_decoder_layers):
        y = layer_cls(cfg, name=f"layers_{i}")(y, *args)
    y = RMSNorm(dtype=cfg.dtype, name="decoder_norm")(y)
    y = _dropout(cfg)(y, deterministic=deterministic)
    if cfg.logits_via_embedding:
      # Tied logits are rescaled as in T5X (the embedding has unit-variance init).
      return self.shared_embedding.attend(y).astype(jnp.float32) / jnp.sqrt(
          jnp.float32(cfg.emb_dim))
    logits = Dense(cfg.emb_dim, cfg.vocab_size, ("embed", "vocab"), jnp.float32,
                   name="logits_dense")(y.astype(jnp.float32))           # [B, T, V]
    return nn.with_logical_constraint(logits, ("batch", "length", "vocab"))


class Transformer(nn.Module):
  """T5.1.1 encoder-decoder; `config.num_kv_heads` < `num_heads` makes the decoder GQA/MQA."""

  config: T5Config

  def setup(self):
    cfg = self.config
    self.token_embedder = Embed(cfg.vocab_size, cfg.emb_dim, cfg.dtype)
    self.encoder = Encoder(cfg, self.token_embedder)
    self.decoder = Decoder(cfg, self.token_embedder)

  def encode(self, encoder_input_tokens, encoder_segment_ids=None, enable_dropout: bool = True):
    """Encoder output [B, S, D]."""
    mask = masks.encoder_mask(encoder_input_tokens, encoder_segment_ids, self.config.dtype)
    return self.encoder(encoder_input_tokens, mask, deterministic=not enable_dropout)

  @property
  def scan_layers(self) -> bool:
    """t5x's models read `module.scan_layers` to choose the scanned cache layout."""
    return self.config.scan_layers

  def decode(self, encoded, encoder_input_tokens, decoder_input_tokens, decoder_target_tokens,
             encoder_segment_ids=None, decoder_segment_ids=None, decoder_positions=None,
             enable_dropout: bool = True, decode: bool = False,
             max_decode_length: Optional[int] = None, prefill: bool = False,
             prefill_lengths: Optional[jnp.ndarray] = None, cross_kv_cached: bool = False):
    """Logits [B, T, vocab] (float32); T5X's signature.

    decode=True: one cached step (T5X's convention; the first call creates the caches).
    prefill=True: T5X's prompt prefill: runs the prompt `decoder_input_tokens` [B, T] through
      the decoder as in training (causal) and stores each example's first `prefill_lengths`
      [B] positions in the self-attention caches (default: its non-zero tokens, T5X's count,
      which leaves the last prompt token to the first decode step) and the projected encoder
      output in the cross-attention caches. The caches' `cache_index` becomes `prefill_lengths`.
    cross_kv_cached=True promises that the cross-attention caches already hold the projected
      encoder output (see `EncoderDecoderModel.prefill_cross_attention`); t5x never passes it
      and then the first step fills them.
    """
    del decoder_positions, max_decode_length  # positions are implied by the cache index
    dtype = self.config.dtype
    if decode:
      self_mask = None  # a cached step masks by position
      cross_mask = masks.make_attention_mask(jnp.ones_like(decoder_target_tokens),
                                             encoder_input_tokens > 0, dtype)
    else:
      self_mask = masks.decoder_mask(decoder_target_tokens, decoder_segment_ids, dtype)
      cross_mask = masks.encoder_decoder_mask(decoder_target_tokens, encoder_input_tokens,
                                              decoder_segment_ids, encoder_segment_ids, dtype)
    if prefill and prefill_lengths is None:
      prefill_lengths = jnp.sum(decoder_input_tokens != 0, axis=1).astype(jnp.int32)
    return self.decoder(encoded, decoder_input_tokens, self_mask, cross_mask,
                        deterministic=not enable_dropout, decode=decode, prefill=prefill,
                        prefill_lengths=prefill_lengths, cross_kv_cached=cross_kv_cached)

  def __call__(self, encoder_input_tokens, decoder_input_tokens, decoder_target_tokens,
               encoder_segment_ids=None, decoder_segment_ids=None, encoder_positions=None,
               decoder_positions=None, *, enable_dropout: bool = True, decode: bool = False):
    del encoder_positions  # T5's relative positions need none
    encoded = self.encode(encoder_input_tokens, encoder_segment_ids=encoder_segment_ids,
                          enable_dropout=enable_dropout)
    return self.decode(encoded, encoder_input_tokens, decoder_input_tokens, decoder_target_tokens,
                       encoder_segment_ids=encoder_segment_ids,
                       decoder_segment_ids=decoder_segment_ids,
                       decoder_positions=decoder_positions, enable_dropout=enable_dropout,
                       decode=decode)
