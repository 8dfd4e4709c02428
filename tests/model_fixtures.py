"""Inputs and parameters shared by the network, decoding and model tests (their configs:
tiny_configs.tiny_config("network", ...))."""

import jax
import jax.numpy as jnp
import numpy as np

from gqa_t5.model import T5Config, Transformer
from tiny_configs import VARIANTS

NUM_HEADS = VARIANTS["network"]["num_heads"]
# K over {N, a divisor, 1}: MHA, GQA, MQA.
KV_HEADS = (NUM_HEADS, 2, 1)


def tiny_batch(batch=3, input_length=9, target_length=6, vocab=VARIANTS["network"]["vocab_size"],
               seed=0):
  """Token batch with padding in the inputs and the targets (ids >= 2: no pad/EOS inside)."""
  rng = np.random.RandomState(seed)
  inputs = rng.randint(2, vocab, (batch, input_length))
  targets = rng.randint(2, vocab, (batch, target_length))
  if batch >= 3:
    inputs[1, input_length - 3:] = 0
    targets[2, target_length - 2:] = 0
  decoder_inputs = np.concatenate([np.zeros((batch, 1), np.int64), targets[:, :-1]], axis=1)
  return {"encoder_input_tokens": jnp.asarray(inputs, jnp.int32),
          "decoder_input_tokens": jnp.asarray(decoder_inputs, jnp.int32),
          "decoder_target_tokens": jnp.asarray(targets, jnp.int32)}


def init_params(config: T5Config, batch, seed=0):
  module = Transformer(config)
  variables = module.init(jax.random.PRNGKey(seed), batch["encoder_input_tokens"],
                          batch["decoder_input_tokens"], batch["decoder_target_tokens"],
                          enable_dropout=False)
  return module, variables["params"]


def forward(module, params, batch, **kwargs):
  """Teacher-forced logits, jitted (op-by-op flax is slow on CPU)."""
  @jax.jit
  def run(params, batch):
    return module.apply({"params": params}, **batch, enable_dropout=False)
  return run(params, batch)
