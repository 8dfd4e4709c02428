"""The decode benchmark's machinery: one set of weights, one compiled decode loop per K.

The MHA weights are initialised once (jitted, on [1, 1] inputs: no full-size forward pass) and
stored at the activation dtype; each GQA/MQA variant is the paper's conversion of them (its
decoder key/value heads mean-pooled per group) and shares every other array with them, so six
variants of XXL cost one set of weights. The encoder does not depend on K: it runs once. Per K,
`prepare` builds the prefilled caches (cross-attention keys/values projected once) and `loop`
runs the greedy steps; the loop is donated the caches and returns them, so XLA runs the loop in
those buffers instead of copying them.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Dict, List, Optional

import jax
import jax.numpy as jnp
import numpy as np

from gqa_t5 import decoding
from gqa_t5 import param_init
from gqa_t5 import perf_model
from gqa_t5.benchmarks import common
from gqa_t5.benchmarks import profile
from gqa_t5.convert import pooling
from gqa_t5.model import Transformer
from gqa_t5.model.config import T5Config
from gqa_t5.models import EncoderDecoderModel


def _model(config: T5Config) -> EncoderDecoderModel:
  return EncoderDecoderModel(Transformer(config), eos_id=-1)  # -1: never stop early


def init_mha_params(config: T5Config, seed: int = 0):
  """Random MHA parameters at the activation dtype, as `param_init` draws them (T5X's
  initialisers; each cast as it is drawn, so no float32 copy is kept), with the logits kernel
  tied to the embedding (transposed) so HF's T5, which ties them, can hold the very same
  weights."""
  params = param_init.init_params(_model(config), jax.random.PRNGKey(seed), dtype=config.dtype)
  return _tie_logits(params, jax.jit(jnp.transpose))


def abstract_mha_params(config: T5Config):
  """`init_mha_params`'s shapes and dtypes, with nothing allocated."""
  def init(rng):
    params = _model(config).get_initial_variables(rng, param_init.INIT_SHAPES)["params"]
    return _tie_logits(jax.tree.map(lambda x: x.astype(config.dtype), params), jnp.transpose)
  return jax.eval_shape(init, jax.random.PRNGKey(0))


def _tie_logits(params, transpose):
  params["decoder"]["logits_dense"]["kernel"] = transpose(params["token_embedder"]["embedding"])
  return params


def pool_kv_heads(mha_params, config: T5Config, num_kv_heads: int):
  """The paper's conversion, by the function `gqa-t5 convert --method mean` applies to each
  decoder key/value kernel (`convert.pooling.pool`), here on the in-memory tree: device arrays,
  or abstract ones under `jax.eval_shape`. Every other array is shared with `mha_params`."""
  decoder = dict(mha_params["decoder"])
  for name, layer in mha_params["decoder"].items():
    if not name.startswith("layers_"):
      continue
    layer = dict(layer)
    for attention in ("self_attention", "encoder_decoder_attention"):
      module = dict(layer[attention])
      for part in ("key", "value"):
        module[part] = {"kernel": pooling.pool(module[part]["kernel"], config.num_heads,
                                               num_kv_heads, "mean")}
      layer[attention] = module
    decoder[name] = layer
  return dict(mha_params, decoder=decoder)


@dataclasses.dataclass
class RunShape:
  batch: int
  input_length: int
  output_length: int       # the caches' length
  timed_steps: int         # steps each timed loop runs (every step reads the full caches)
  encode_batch: int = 8    # rows per encoder call (bounds the encoder's attention buffers)


class DecodeVariant:
  """One K: its parameters, step bytes and compiled prepare / loop functions."""

  def __init__(self, base: T5Config, num_kv_heads: int, shape: RunShape, mha_params):
    self.num_kv_heads = num_kv_heads
    self.config = base.replace(num_kv_heads=num_kv_heads)
    self.model = _model(self.config)
    self.params = None
    self.set_params(mha_params)
    self.shape = shape
    self.bytes = perf_model.decode_step_bytes(self.config, shape.batch, shape.input_length,
                                              shape.output_length)
    self.loop_times: List[float] = []
    self.tokens: Optional[np.ndarray] = None
    self.prepare = self.loop = None

  def set_params(self, mha_params) -> None:
    """This K's parameters from the MHA ones (abstract ShapeDtypeStructs before they exist)."""
    if self.num_kv_heads == self.config.num_heads:
      self.params = mha_params
      return
    pool = lambda p: pool_kv_heads(p, self.config, self.num_kv_heads)
    abstract = isinstance(jax.tree.leaves(mha_params)[0], jax.ShapeDtypeStruct)
    self.params = jax.eval_shape(pool, mha_params) if abstract else pool(mha_params)

  def lower(self, encoded, inputs) -> Dict[str, Any]:
    model, s = self.model, self.shape

    def prepare(params, encoded, inputs):
      cache = model.init_cache(params, s.batch, s.input_length, s.output_length)
      return model.prefill_cross_attention(params, cache, encoded, inputs)

    def loop(params, encoded, inputs, cache):
      fn = model.tokens_to_logits_fn(params, encoded, inputs)
      tokens, _, cache = decoding.temperature_sample(
          cache, fn, s.batch, s.timed_steps, eos_id=-1, temperature=0.0, return_cache=True)
      return tokens, cache

    cache = jax.eval_shape(prepare, self.params, encoded, inputs)
    k = self.num_kv_heads
    return {f"prepare K={k}": jax.jit(prepare).lower(self.params, encoded, inputs),
            f"loop K={k}": jax.jit(loop, donate_argnums=(3,)).lower(
                self.params, encoded, inputs, cache)}

  def set_compiled(self, compiled: Dict[str, Any]) -> None:
    self.prepare = compiled[f"prepare K={self.num_kv_heads}"]
    self.loop = compiled[f"loop K={self.num_kv_heads}"]

  def run_once(self, encoded, inputs) -> float:
    """Seconds of one timed loop (the caches are prefilled, untimed, before it)."""
    cache = jax.block_until_ready(self.prepare(self.params, encoded, inputs))
    start = time.perf_counter()
    tokens, cache = self.loop(self.params, encoded, inputs, cache)
    jax.block_until_ready(tokens)
    seconds = time.perf_counter() - start
    self.tokens = np.asarray(tokens)
    jax.tree.map(lambda x: x.delete(), cache)  # free the caches before the next variant's
    self.loop_times.append(seconds)
    return seconds

  def profile_loop(self, encoded, inputs) -> Dict[str, Any]:
    """A profile of one decode loop (`profile.summarize`, per step); the caches are prefilled
    before the trace starts."""
    cache = jax.block_until_ready(self.prepare(self.params, encoded, inputs))
    return profile.summarize(lambda: self.loop(self.params, encoded, inputs, cache)[0],
                             per=self.shape.timed_steps)


class CompiledEncoder:
  """The (K-independent) encoder, compiled for `encode_batch` rows and run chunk by chunk."""

  def __init__(self, config: T5Config, shape: RunShape, params):
    module = _model(config).module
    self.chunk = max(d for d in range(1, min(shape.encode_batch, shape.batch) + 1)
                     if shape.batch % d == 0)
    tokens = jax.ShapeDtypeStruct((self.chunk, shape.input_length), jnp.int32)
    self.lowered = jax.jit(lambda p, x: module.apply(
        {"params": p}, x, enable_dropout=False, method=module.encode)).lower(params, tokens)
    self.compiled = None
    self.encoded_shape = jax.ShapeDtypeStruct(
        (shape.batch, shape.input_length, config.emb_dim), jnp.dtype(config.dtype))

  def __call__(self, params, inputs):
    parts = [self.compiled(params, inputs[i:i + self.chunk])
             for i in range(0, inputs.shape[0], self.chunk)]
    return parts[0] if len(parts) == 1 else jnp.concatenate(parts, axis=0)


def compile_variants(variants: List[DecodeVariant], encoded, inputs, extra=None) -> float:
  """Lowers (here) and compiles (in threads) the variants' functions; returns wall seconds."""
  start = time.perf_counter()
  lowered = dict(extra or {})
  for variant in variants:
    lowered.update(variant.lower(encoded, inputs))
  compiled = common.compile_parallel(lowered)
  for variant in variants:
    variant.set_compiled(compiled)
  if extra:
    for name in extra:
      extra[name] = compiled[name]
  return time.perf_counter() - start
