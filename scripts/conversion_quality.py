"""Loss right after conversion (before any uptraining, alpha = 0) for each method and K.

Reads a trained multi-head checkpoint (any supported format), converts it in memory with every
requested method and key/value head count, and prints the loss per non-padding target token on
a TSV data set (input<TAB>target per line, tokenised with a SentencePiece model, EOS appended
after truncation as seqio does). Example, on the t5x fixture:

  F=../shared/fixtures/t5x_tiny
  python scripts/conversion_quality.py --checkpoint $F/checkpoint_f32/checkpoint_20 \
      --data $F/data/validation.tsv --calibration-data $F/data/train.tsv \
      --vocab $F/spm.model --input-prefix "name: "
"""

from __future__ import annotations

import argparse
import os
import sys
import time

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, _REPO)


def parse_args(argv):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--checkpoint", required=True)
  parser.add_argument("--format", default="auto")
  parser.add_argument("--data", required=True, help="TSV file: input<TAB>target per line")
  parser.add_argument("--vocab", required=True, help="SentencePiece model")
  parser.add_argument("--input-prefix", default="", help='e.g. "summarize: "')
  parser.add_argument("--input-length", type=int, default=64)
  parser.add_argument("--target-length", type=int, default=16)
  parser.add_argument("--max-examples", type=int, default=None)
  parser.add_argument("--batch-size", type=int, default=64)
  parser.add_argument("--methods", default="mean,first,random,aligned,aligned-calibrated",
                      help="'aligned-calibrated' aligns on key/value inputs of "
                           "--calibration-data (skipped without it)")
  parser.add_argument("--calibration-data", default=None,
                      help="TSV for aligned-calibrated; keep it apart from --data")
  parser.add_argument("--calibration-examples", type=int, default=64)
  parser.add_argument("--kv-heads", default=None,
                      help="comma-separated K values (default: every divisor of N below N)")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
  return parser.parse_args(argv)


def load_examples(args, path, max_examples):
  from gqa_t5.convert.calibration import load_tsv_examples
  return load_tsv_examples(path, args.vocab, args.input_prefix, args.input_length,
                           args.target_length, max_examples)


def loss_per_token(config, params, examples, batch_size):
  from gqa_t5 import evaluation, models
  from gqa_t5.model.network import Transformer
  # Cross-entropy only (no z-loss): the loss of the converted model as it stands.
  model = models.EncoderDecoderModel(Transformer(config), z_loss=0.0)
  inputs, decoder_inputs, targets = examples
  batches = ({"encoder_input_tokens": inputs[i:i + batch_size],
              "decoder_input_tokens": decoder_inputs[i:i + batch_size],
              "decoder_target_tokens": targets[i:i + batch_size]}
             for i in range(0, len(inputs), batch_size))
  return evaluation.teacher_forced_eval(model, params, batches)["loss"]


def main(argv=None) -> int:
  args = parse_args(argv)
  import jax.numpy as jnp
  from gqa_t5.checkpoints.detect import open_checkpoint
  from gqa_t5.convert.converter import ConversionSpec, convert_params
  from gqa_t5.model import grouping

  source = open_checkpoint(args.checkpoint, format=args.format)
  config = source.config.replace(dtype=jnp.bfloat16 if args.dtype == "bfloat16" else jnp.float32,
                                 dropout_rate=0.0)
  params = source.read_all()
  examples = load_examples(args, args.data, args.max_examples)
  n = config.num_heads
  kv_values = ([int(k) for k in args.kv_heads.split(",")] if args.kv_heads
               else grouping.valid_kv_heads(n)[:-1])
  methods = [m for m in args.methods.split(",") if m]
  grams = None
  if "aligned-calibrated" in methods:
    if args.calibration_data:
      from gqa_t5.convert.calibration import input_grams
      calibration = load_examples(args, args.calibration_data, args.calibration_examples)
      grams = input_grams(config, params, calibration)
    else:
      methods.remove("aligned-calibrated")
  print(f"checkpoint {args.checkpoint} ({source.format}, step {source.step}): N={n} heads, "
        f"{config.num_decoder_layers} decoder layers; {len(examples[0])} examples from "
        f"{args.data}")
  start = time.time()
  base = loss_per_token(config, params, examples, args.batch_size)
  print(f"{'method':<20}{'K':>4}  loss/token (alpha=0)")
  print(f"{'MHA':<20}{n:>4}  {base:.4f}")
  for k in kv_values:
    for method in methods:
      calibrated = method == "aligned-calibrated"
      spec = ConversionSpec(k, method="aligned" if calibrated else method, seed=args.seed)
      converted, out_config = convert_params(params, config, spec, grams if calibrated else None)
      loss = loss_per_token(out_config, converted, examples, args.batch_size)
      print(f"{method:<20}{k:>4}  {loss:.4f}", flush=True)
  print(f"({time.time() - start:.0f}s)")
  return 0


if __name__ == "__main__":
  for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS"):
    os.environ.setdefault(_var, "1")  # tiny SVDs of 'aligned' (see gqa_t5/convert/__main__.py)
  sys.exit(main())
