"""Training throughput: tokens/s and step time of our compiled train step for a given shape.

One step = forward + backward + Adafactor update on a batch of B (inputs, targets) rows of
random tokens (no padding), float32 parameters, activations in --dtype. Tokens counted: B *
(input_length + target_length) per step. The step is timed after --warmup untimed steps, as the
median of --steps timed ones (each synchronised).

With --compare-hf, HF transformers' T5ForConditionalGeneration (torch, same dimensions, same
batch, gated-GELU T5.1.1, its Adafactor with T5's settings) runs the same step in the same
process, and the ratio (ours / HF tokens per second) is printed. HF has no grouped-query
attention, so the comparison uses K = num_heads (MHA) unless --kv-heads says otherwise for ours.
On a GPU, model-FLOPs utilisation is reported from XLA's FLOP count of the compiled step and
the device's peak (--peak-tflops, default: known peaks by device name).

  python scripts/benchmark_train.py --shape small --compare-hf
  python scripts/benchmark_train.py --shape base --batch 32 --dtype bfloat16 --kv-heads 1
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from typing import Dict, Optional

import jax
import numpy as np

SHAPES = {
    # A CPU-sized shape (T5.1.1 Small's width, fewer layers) and T5X's sizes.
    "cpu": dict(emb_dim=512, num_heads=8, head_dim=64, mlp_dim=1024, layers=4, vocab=32128,
                input_length=256, target_length=64, batch=8),
    "small": dict(emb_dim=512, num_heads=6, head_dim=64, mlp_dim=1024, layers=8, vocab=32128,
                  input_length=512, target_length=128, batch=16),
    "base": dict(emb_dim=768, num_heads=12, head_dim=64, mlp_dim=2048, layers=12, vocab=32128,
                 input_length=512, target_length=128, batch=32),
    "large": dict(emb_dim=1024, num_heads=16, head_dim=64, mlp_dim=2816, layers=24,
                  vocab=32128, input_length=512, target_length=128, batch=32),
}
# Dense bfloat16 peak TFLOP/s by device-kind substring, for MFU.
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L4": 121.0, "v5e": 197.0,
               "v4": 275.0, "v5p": 459.0}


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--shape", choices=sorted(SHAPES), default="cpu")
  for name in ("emb_dim", "num_heads", "head_dim", "mlp_dim", "layers", "vocab",
               "input_length", "target_length", "batch"):
    parser.add_argument("--" + name.replace("_", "-"), type=int, default=None)
  parser.add_argument("--kv-heads", type=int, default=None, help="K (default: num_heads)")
  parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
  parser.add_argument("--steps", type=int, default=10)
  parser.add_argument("--warmup", type=int, default=2)
  parser.add_argument("--compare-hf", action="store_true")
  parser.add_argument("--peak-tflops", type=float, default=None)
  parser.add_argument("--json", default=None, help="also write the results to this file")
  args = parser.parse_args(argv)
  shape = dict(SHAPES[args.shape])
  for name in shape:
    value = getattr(args, name)
    if value is not None:
      shape[name] = value
  return args, shape


def synthetic_batch(shape: Dict[str, int], seed: int = 0) -> Dict[str, np.ndarray]:
  rng = np.random.default_rng(seed)
  b, s, t = shape["batch"], shape["input_length"], shape["target_length"]
  inputs = rng.integers(2, shape["vocab"], (b, s)).astype(np.int32)
  targets = rng.integers(2, shape["vocab"], (b, t)).astype(np.int32)
  decoder_inputs = np.concatenate([np.zeros((b, 1), np.int32), targets[:, :-1]], axis=1)
  return {"encoder_input_tokens": inputs, "decoder_input_tokens": decoder_inputs,
          "decoder_target_tokens": targets,
          "decoder_loss_weights": np.ones((b, t), np.float32)}


def _time_interleaved(step_fns, steps: int, warmup: int):
  """Alternates the step functions; returns each one's list of step times."""
  for fn in step_fns:
    for _ in range(warmup):
      fn()
  times = [[] for _ in step_fns]
  for _ in range(steps):
    for fn, out in zip(step_fns, times):
      t0 = time.perf_counter()
      fn()
      out.append(time.perf_counter() - t0)
  return times


def build_ours(shape, kv_heads: Optional[int], dtype: str):
  """(step function, facts) for our compiled train step."""
  from gqa_t5 import models, optim, partitioning
  from gqa_t5 import trainer as trainer_lib
  from gqa_t5.model import T5Config, Transformer
  config = T5Config(vocab_size=shape["vocab"], dtype=dtype, emb_dim=shape["emb_dim"],
                    num_heads=shape["num_heads"], head_dim=shape["head_dim"],
                    mlp_dim=shape["mlp_dim"], num_encoder_layers=shape["layers"],
                    num_decoder_layers=shape["layers"], dropout_rate=0.0,
                    num_kv_heads=kv_heads)
  model = models.EncoderDecoderModel(Transformer(config))
  batch = synthetic_batch(shape)
  spec = {k: (v.shape, v.dtype) for k, v in batch.items()}
  trainer = trainer_lib.Trainer(model, optim.Adafactor(learning_rate=optim.constant(1e-3)),
                                partitioning.Partitioner(), spec)
  t0 = time.perf_counter()
  compiled = trainer.compile_train_step()
  compile_s = time.perf_counter() - t0
  flops = None
  try:
    analysis = compiled.cost_analysis()
    if isinstance(analysis, list):
      analysis = analysis[0]
    flops = float(analysis.get("flops", 0.0)) or None
  except Exception:  # pylint: disable=broad-except
    pass
  state = {"s": trainer.init_state()}
  device_batch = trainer.shard_batch(batch)

  def run_step():
    state["s"], metrics = trainer.train_step(state["s"], device_batch)
    jax.block_until_ready(metrics["loss"])

  params = sum(x.size for x in jax.tree.leaves(trainer.abstract_params))
  return run_step, {"compile_s": compile_s, "flops_per_step": flops, "params": int(params)}


def build_hf(shape, dtype: str):
  """The step function of HF transformers' T5 (torch) with T5's Adafactor settings."""
  import torch
  from transformers import T5Config as HFConfig, T5ForConditionalGeneration
  from transformers.optimization import Adafactor as HFAdafactor
  torch.manual_seed(0)
  torch.set_num_threads(os.cpu_count() or 1)
  config = HFConfig(vocab_size=shape["vocab"], d_model=shape["emb_dim"],
                    d_kv=shape["head_dim"], d_ff=shape["mlp_dim"],
                    num_layers=shape["layers"], num_decoder_layers=shape["layers"],
                    num_heads=shape["num_heads"], feed_forward_proj="gated-gelu",
                    dropout_rate=0.0, tie_word_embeddings=False, decoder_start_token_id=0,
                    pad_token_id=0)
  device = "cuda" if torch.cuda.is_available() else "cpu"
  model = T5ForConditionalGeneration(config).to(device)
  model.train()
  # T5's Adafactor settings: parameter-scaled updates, clipping 1.0, decay -0.8, no momentum.
  optimizer = HFAdafactor(model.parameters(), lr=1e-3, scale_parameter=True,
                          relative_step=False, warmup_init=False, clip_threshold=1.0,
                          decay_rate=-0.8, beta1=None)
  batch = synthetic_batch(shape)
  inputs = torch.from_numpy(batch["encoder_input_tokens"].astype(np.int64)).to(device)
  labels = torch.from_numpy(batch["decoder_target_tokens"].astype(np.int64)).to(device)
  autocast = (torch.autocast(device_type=device, dtype=torch.bfloat16)
              if dtype == "bfloat16" else None)

  def run_step():
    optimizer.zero_grad(set_to_none=True)
    if autocast is not None:
      with autocast:
        loss = model(input_ids=inputs, labels=labels).loss
    else:
      loss = model(input_ids=inputs, labels=labels).loss
    loss.backward()
    optimizer.step()
    if device == "cuda":
      torch.cuda.synchronize()
    return float(loss.detach())

  return run_step


def _peak_tflops(explicit: Optional[float]) -> Optional[float]:
  if explicit:
    return explicit
  kind = jax.devices()[0].device_kind
  for name, tflops in PEAK_TFLOPS.items():
    if name.lower() in kind.lower():
      return tflops
  return None


def main(argv=None) -> int:
  args, shape = parse_args(argv)
  tokens = shape["batch"] * (shape["input_length"] + shape["target_length"])
  device = jax.devices()[0]
  print(f"device: {device.platform} ({device.device_kind}), {jax.device_count()} device(s); "
        f"shape {shape}; K={args.kv_heads or shape['num_heads']}; dtype {args.dtype}")
  ours_step, facts = build_ours(shape, args.kv_heads, args.dtype)
  step_fns = [ours_step]
  if args.compare_hf:
    step_fns.append(build_hf(shape, args.dtype))
  times = _time_interleaved(step_fns, args.steps, args.warmup)
  ours = dict(facts, step_s=statistics.median(times[0]), min_step_s=min(times[0]))
  ours["tokens_per_s"] = tokens / ours["step_s"]
  print(f"ours: {ours['step_s'] * 1e3:.1f} ms/step (min {ours['min_step_s'] * 1e3:.1f}), "
        f"{ours['tokens_per_s']:,.0f} tokens/s, {ours['params'] / 1e6:.1f}M params, "
        f"compiled in {ours['compile_s']:.1f}s")
  results = {"shape": shape, "kv_heads": args.kv_heads or shape["num_heads"],
             "dtype": args.dtype, "device": device.device_kind, "ours": ours}
  if device.platform == "gpu" and ours["flops_per_step"]:
    peak = _peak_tflops(args.peak_tflops)
    achieved = ours["flops_per_step"] / ours["step_s"] / 1e12
    results["achieved_tflops"] = achieved
    if peak:
      results["mfu"] = achieved / peak
      print(f"model FLOPs utilisation: {achieved:.1f} TFLOP/s of {peak:.0f} peak = "
            f"{100 * achieved / peak:.1f}% (XLA's FLOP count of the step)")
  if args.compare_hf:
    hf = {"step_s": statistics.median(times[1]), "min_step_s": min(times[1])}
    hf["tokens_per_s"] = tokens / hf["step_s"]
    results["hf"] = hf
    results["ratio"] = ours["tokens_per_s"] / hf["tokens_per_s"]
    results["ratio_of_min_step_times"] = hf["min_step_s"] / ours["min_step_s"]
    print(f"HF transformers (torch): {hf['step_s'] * 1e3:.1f} ms/step "
          f"(min {hf['min_step_s'] * 1e3:.1f}), {hf['tokens_per_s']:,.0f} tokens/s")
    print(f"ratio ours / HF: {results['ratio']:.2f}x (medians; "
          f"{results['ratio_of_min_step_times']:.2f}x from the fastest steps)")
  if args.json:
    with open(args.json, "w") as f:
      json.dump(results, f, indent=2)
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
