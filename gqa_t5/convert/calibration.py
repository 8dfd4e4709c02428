"""Calibration for `--method aligned`: key/value input statistics from a small batch.

Aligning heads on their weights treats every input direction alike; aligning them on what the
heads actually see weights the directions the data uses. For the key/value projection of a
decoder layer with inputs X [tokens, D], the Procrustes objective ||X (K_n R - ref)||² only
needs the Gram matrix X^T X [D, D], so calibration reduces to one forward pass that records:
  * self-attention: the output of each layer's pre_self_attention_layer_norm (decoder tokens);
  * encoder-decoder attention: the encoder output (input tokens), the same for every layer.
Padding tokens are left out. This runs the network, so the whole model is in memory once.
"""

from __future__ import annotations

import csv
from typing import Dict, Tuple

import numpy as np

from gqa_t5.checkpoints.errors import CheckpointError

Batch = Tuple[np.ndarray, np.ndarray, np.ndarray]


def load_tsv_examples(path: str, vocab: str, input_prefix: str = "", input_length: int = 512,
                      target_length: int = 128, max_examples=None) -> Batch:
  """(encoder inputs, decoder inputs, targets) from 'input<TAB>target' lines.

  Tokenised with a SentencePiece model, truncated with EOS appended after the cut and padded
  with 0, as seqio's `append_eos_after_trim` and T5X's feature converter do.
  """
  import sentencepiece  # optional extra ('data'): only calibrated conversions tokenise text
  try:
    processor = sentencepiece.SentencePieceProcessor(model_file=vocab)
  except (OSError, RuntimeError) as error:
    raise CheckpointError(f"cannot load SentencePiece model {vocab}: {error}") from error
  eos = processor.eos_id()

  def encode(text: str, length: int):
    ids = processor.encode(text)[:length - 1] + [eos]
    return ids + [0] * (length - len(ids))

  try:
    with open(path, newline="") as f:
      rows = [r for r in csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE) if len(r) >= 2]
  except OSError as error:
    raise CheckpointError(f"cannot read calibration data {path}: {error}") from error
  if max_examples:
    rows = rows[:max_examples]
  if not rows:
    raise CheckpointError(f"calibration data {path} has no 'input<TAB>target' lines")
  inputs = np.array([encode(input_prefix + r[0], input_length) for r in rows], np.int32)
  targets = np.array([encode(r[1], target_length) for r in rows], np.int32)
  decoder_inputs = np.concatenate([np.zeros_like(targets[:, :1]), targets[:, :-1]], axis=1)
  return inputs, decoder_inputs, targets


def _gram(values, mask) -> np.ndarray:
  x = np.asarray(values, np.float64).reshape(-1, values.shape[-1])[np.asarray(mask).reshape(-1)]
  if not len(x):
    raise CheckpointError("calibration batch has no non-padding tokens")
  return x.T @ x / len(x)


def input_grams(config, params, batch: Batch, batch_size: int = 32) -> Dict[str, np.ndarray]:
  """{'decoder/layers_i/<attention>': X^T X / tokens} of the key/value inputs of each layer."""
  # Only calibration runs the network: flax and the network load here, so every other
  # conversion (and importing gqa_t5.convert) goes without them; convert/ imports no jax itself.
  import jax
  from gqa_t5.model.network import Transformer
  config = config.replace(dropout_rate=0.0)

  @jax.jit
  def intermediates(params, inputs, decoder_inputs, targets):
    _, state = Transformer(config).apply(
        {"params": params}, inputs, decoder_inputs, targets, enable_dropout=False,
        capture_intermediates=True, mutable=["intermediates"])
    captured = state["intermediates"]
    layers = [captured["decoder"][f"layers_{i}"]["pre_self_attention_layer_norm"]["__call__"][0]
              for i in range(config.num_decoder_layers)]
    return captured["encoder"]["__call__"][0], layers

  sums: Dict[str, np.ndarray] = {}
  counts: Dict[str, int] = {}

  def add(name, values, mask):
    mask = np.asarray(mask).reshape(-1)
    tokens = int(mask.sum())
    if tokens:
      sums[name] = sums.get(name, 0) + _gram(values, mask) * tokens
      counts[name] = counts.get(name, 0) + tokens

  inputs, decoder_inputs, targets = batch
  for start in range(0, len(inputs), batch_size):
    part = slice(start, start + batch_size)
    encoded, layers = intermediates(params, inputs[part], decoder_inputs[part], targets[part])
    add("encoded", encoded, inputs[part] > 0)
    for i, values in enumerate(layers):
      add(f"decoder/layers_{i}/self_attention", values, targets[part] > 0)
  if "encoded" not in counts:
    raise CheckpointError("calibration batch has no non-padding input tokens")
  grams = {name: sums[name] / counts[name] for name in sums if name != "encoded"}
  cross = sums["encoded"] / counts["encoded"]
  for i in range(config.num_decoder_layers):
    grams[f"decoder/layers_{i}/encoder_decoder_attention"] = cross
  return grams
