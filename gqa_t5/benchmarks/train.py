"""Training throughput of our compiled train step for MHA, GQA and MQA side by side.

One step = forward + backward + Adafactor (gqa_t5.optim, T5.1.1's settings) update on a batch of
random tokens (no padding), float32 parameters, bfloat16 activations, through
`gqa_t5.trainer.Trainer` (partitioned init from shapes, the jitted step users train with).
Reported per K: step time, tokens/s (B x (inputs + targets) per step), and model-FLOPs
utilisation: the model's FLOPs of a step (`perf_model.train_step_flops`: forward, backward at
twice the forward; HF's row the same model's) per second over the device's dense bf16 peak
(--peak-tflops; known GPU/TPU kinds by name; n/a on a CPU unless given). XLA's own count of the
compiled step is reported beside it as information: it agrees on a CPU, but on a GPU it came
out at about a fifth of the model's FLOPs (2026-12-04, an H200), so it does not measure
utilisation there. Checks: GQA/MQA not slower than MHA, MFU >= 45%, and with --compare-hf ours
>= 1.5x HF transformers' T5 (torch, same device and shapes, bf16 autocast, its Adafactor) in
tokens/s. Steps of all models are interleaved so drift hits all alike.

  gqa-t5 benchmark-train --compare-hf                 (T5.1.1-Large, inputs 512, targets 128)
  gqa-t5 benchmark-train --smoke --compare-hf --json out.json   (tiny, seconds on a CPU)
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings
from typing import Any, Dict, List, Optional

import jax
import numpy as np

from gqa_t5 import jax_setup, models, optim, partitioning, perf_model, schedules
from gqa_t5 import trainer as trainer_lib
from gqa_t5.benchmarks import common, hf_reference, profile
from gqa_t5.model import Transformer, grouping, sizes

# name: (size, input length, target length, batch, K values, activation dtype)
PRESETS = {
    "large": ("large", 512, 128, 32, (16, 8, 1), "bfloat16"),
    "smoke": ("tiny", 32, 8, 2, (8, 1), "float32"),
}
MFU_TARGET, HF_TARGET, SLOWER_TOLERANCE = 0.45, 1.5, 0.03


def parse_args(argv=None):
  parser = argparse.ArgumentParser(prog="gqa-t5 benchmark-train", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--shape", choices=("large",), default="large")
  common.add_common_flags(parser)
  parser.add_argument("--batch", type=common.positive_int, default=None)
  parser.add_argument("--layers", type=common.positive_int, default=None,
                      help="override both stacks' depth")
  parser.add_argument("--kv-heads", default=None, help="comma-separated K (default: N, 8, 1)")
  parser.add_argument("--dtype", choices=("float32", "bfloat16"), default=None)
  parser.add_argument("--steps", type=common.positive_int, default=None,
                      help="timed steps per model")
  parser.add_argument("--warmup", type=int, default=None, help="untimed steps (default 2)")
  parser.add_argument("--scan-layers", action="store_true",
                      help="scan each stack (shorter compile)")
  parser.add_argument("--peak-tflops", type=float, default=None)
  parser.add_argument("--compare-hf", action="store_true")
  parser.add_argument("--profile", action="store_true",
                      help="after timing, trace two steps per K and print where their time goes "
                           "(operations per step, device busy vs idle, the top ones)")
  parser.add_argument("--hf-optimizer", choices=("adafactor", "adamw"), default="adafactor")
  args = parser.parse_args(argv)
  size, s, t, b, kv, dtype = PRESETS["smoke" if args.smoke else args.shape]
  overrides = {"dtype": args.dtype or dtype, "dropout_rate": 0.0,
               "scan_layers": args.scan_layers}
  if args.smoke and not args.layers:
    args.layers = 1  # the smoke run compiles three train steps: keep them small
  if args.layers:
    overrides.update(num_encoder_layers=args.layers, num_decoder_layers=args.layers)
  args.config = sizes.t5_1_1(size, **overrides)
  args.kv = ([int(k) for k in args.kv_heads.split(",")] if args.kv_heads else list(kv))
  for k in args.kv:
    if k not in grouping.valid_kv_heads(args.config.num_heads):
      parser.error(f"--kv-heads value {k} does not divide num_heads={args.config.num_heads}")
  args.lengths = (s, t)
  args.batch = args.batch or b
  args.steps = args.steps or (2 if args.smoke else 10)
  args.warmup = args.warmup if args.warmup is not None else (1 if args.smoke else 2)
  return args


def synthetic_batch(batch: int, lengths, vocab: int, seed: int = 0) -> Dict[str, np.ndarray]:
  rng = np.random.default_rng(seed)
  s, t = lengths
  inputs = rng.integers(2, vocab, (batch, s)).astype(np.int32)
  targets = rng.integers(2, vocab, (batch, t)).astype(np.int32)
  decoder_inputs = np.concatenate([np.zeros((batch, 1), np.int32), targets[:, :-1]], axis=1)
  return {"encoder_input_tokens": inputs, "decoder_input_tokens": decoder_inputs,
          "decoder_target_tokens": targets, "decoder_loss_weights": np.ones((batch, t), np.float32)}


class GqaTrainStep:
  """gqa_t5's train step for one K (the side HF's is measured against): a Trainer, its lowered
  and compiled step, state and device batch."""

  def __init__(self, config, k: int, batch: Dict[str, np.ndarray]):
    self.name = grouping.kv_label(k, config.num_heads)
    self.k = k
    model = models.EncoderDecoderModel(Transformer(config.replace(num_kv_heads=k)))
    spec = {name: (v.shape, v.dtype) for name, v in batch.items()}
    self.trainer = trainer_lib.Trainer(
        model, optim.Adafactor(learning_rate=schedules.constant(1e-3)), partitioning.Partitioner(),
        spec)
    abstract_batch = {name: jax.ShapeDtypeStruct(s, d, sharding=self.trainer.batch_shardings[name])
                      for name, (s, d) in spec.items()}
    partitioner = self.trainer.partitioner
    with warnings.catch_warnings(), partitioner.mesh, partitioner.axis_rules():
      warnings.simplefilter("ignore", DeprecationWarning)  # `with mesh:`, as the Trainer's own
      # The Trainer's own jitted step, lowered here and compiled with the others in threads.
      self.lowered = self.trainer._jit_train_step().lower(  # pylint: disable=protected-access
          self.trainer.abstract_state, abstract_batch)
    self.host_batch = batch
    self.compiled = self.state = self.batch = None
    self.times: List[float] = []

  def start(self, compiled) -> None:
    self.compiled = compiled
    self.state = self.trainer.init_state()
    self.batch = self.trainer.shard_batch(self.host_batch)

  def step(self) -> float:
    self.state, metrics = self.compiled(self.state, self.batch)
    return float(jax.block_until_ready(metrics["loss"]))

  def xla_flops(self) -> Optional[float]:
    """XLA's FLOP count of the compiled step (information: see the module's docstring)."""
    analysis = self.compiled.cost_analysis()
    if isinstance(analysis, (list, tuple)):
      analysis = analysis[0] if analysis else {}
    return float(analysis.get("flops", 0.0)) or None if analysis else None

  def params(self) -> int:
    return int(sum(x.size for x in jax.tree.leaves(self.trainer.abstract_params)))


def peak_tflops(explicit: Optional[float]) -> Optional[float]:
  """--peak-tflops, else the dense bf16 peak of this device's chip (`perf_model.CHIPS`)."""
  if explicit:
    return explicit
  chip = perf_model.chip_of_device_kind(jax.devices()[0].device_kind)
  return chip.peak_flops / 1e12 if chip else None


def time_interleaved(fns, steps: int, warmup: int, labels) -> List[List[float]]:
  common.progress(f"warming up ({warmup} steps each) ...")
  for fn in fns:
    for _ in range(warmup):
      fn()
  times = [[] for _ in fns]
  common.progress(f"timing {steps} steps each of {', '.join(labels)} ...")
  for _ in range(steps):
    for fn, out in zip(fns, times):
      start = time.perf_counter()
      fn()
      out.append(time.perf_counter() - start)
  return times


def figures(seconds: List[float], tokens: int, flops: float, peak: Optional[float],
            xla_flops: Optional[float] = None) -> Dict[str, Any]:
  """Step time (median, min), tokens/s, the model FLOPs per second and MFU against `peak`
  (TFLOP/s; None: unknown), and XLA's count of the step's FLOPs where there is one."""
  step = statistics.median(seconds)
  out = {"step_s": step, "min_step_s": min(seconds), "tokens_per_s": tokens / step,
         "flops_per_step": flops, "xla_flops_per_step": xla_flops,
         "achieved_tflops": flops / step / 1e12}
  out["mfu"] = out["achieved_tflops"] / peak if peak else None
  return out


def checks(results: Dict[str, Any]) -> List[Dict[str, Any]]:
  out = []
  ours = results["ours"]
  mha = ours[0]
  slower = [r for r in ours[1:] if r["step_s"] > mha["step_s"] * (1 + SLOWER_TOLERANCE)]
  out.append(common.check(
      f"GQA/MQA train no slower than MHA ({SLOWER_TOLERANCE:.0%} tolerance)", not slower,
      ", ".join(f"{r['name']}: {r['step_s'] * 1e3:.1f} ms" for r in ours)))
  if mha["mfu"] is not None:
    out.append(common.check(f"MFU >= {MFU_TARGET:.0%}", all(r["mfu"] >= MFU_TARGET for r in ours),
                            ", ".join(f"{r['name']}: {r['mfu']:.1%}" for r in ours)))
  hf = results.get("hf")
  if hf and "skipped" not in hf:
    ratio = mha["tokens_per_s"] / hf["tokens_per_s"]
    out.append(common.check(
        f"ours >= {HF_TARGET}x HF transformers' tokens/s", ratio >= HF_TARGET,
        f"{ratio:.2f}x: ours (MHA) {mha['step_s'] * 1e3:.1f} ms, HF {hf['step_s'] * 1e3:.1f} ms "
        f"per step on {hf['device']} ({hf['optimizer']})"))
  return out


def _hf_step(args, config, batch):
  """(HF's step function or None, None or {'skipped': why})."""
  if not hf_reference.available():
    return None, {"skipped": "torch and transformers are not installed"}
  try:
    device = hf_reference.torch_device()
  except RuntimeError as error:
    return None, {"skipped": str(error)}
  common.progress(f"building HF T5 ({device}) ...")
  return hf_reference.train_step_fn(config, batch, np.dtype(config.dtype).name,
                                    args.hf_optimizer), None


def main(argv=None) -> int:
  args = parse_args(argv)
  cache_dir = jax_setup.enable_compilation_cache(args.jax_cache_dir)
  config, (s, t) = args.config, args.lengths
  facts = common.device_facts()
  common.progress(f"{facts['backend']} ({facts['device_kind']}); {config.emb_dim}d, "
                  f"{config.num_encoder_layers}+{config.num_decoder_layers} layers, batch "
                  f"{args.batch} x ({s} + {t}), activations {np.dtype(config.dtype).name}, "
                  f"K {args.kv}; compilation cache {cache_dir}")
  batch = synthetic_batch(args.batch, (s, t), config.vocab_size)
  start = time.perf_counter()
  ours = [GqaTrainStep(config, k, batch) for k in args.kv]
  compiled = common.compile_parallel({o.name: o.lowered for o in ours})
  compile_s = time.perf_counter() - start
  for o in ours:
    o.start(compiled[o.name])
  ours[0].step()  # counts as a warm-up step
  first_step_s = common.since_start()
  fns, labels = [o.step for o in ours], [o.name for o in ours]
  hf_step, hf = _hf_step(args, config, batch) if args.compare_hf else (None, None)
  if hf_step:
    fns.append(hf_step)
    labels.append("HF")
  times = time_interleaved(fns, args.steps, args.warmup, labels)
  tokens, peak = args.batch * (s + t), peak_tflops(args.peak_tflops)
  results = {"benchmark": "train", "smoke": bool(args.smoke), "device": facts,
             "config": {"size": "tiny" if args.smoke else args.shape, "emb_dim": config.emb_dim,
                        "layers": config.num_decoder_layers, "dtype": np.dtype(config.dtype).name,
                        "scan_layers": config.scan_layers},
             "run": {"batch": args.batch, "input_length": s, "target_length": t,
                     "steps": args.steps, "tokens_per_step": tokens}, "peak_tflops": peak,
             "compile_s": compile_s, "process_start_to_first_step_s": first_step_s,
             "ours": []}
  # MFU's numerator: the model's FLOPs of a step of each K (HF's T5 is the multi-head model).
  step_flops = {k: perf_model.train_step_flops(config.replace(num_kv_heads=k), batch=args.batch,
                                               input_length=s, target_length=t)
                for k in args.kv + [None]}
  for o, seconds in zip(ours, times):
    results["ours"].append(dict(figures(seconds, tokens, step_flops[o.k], peak, o.xla_flops()),
                                name=o.name, kv_heads=o.k, params=o.params()))
    if args.profile:
      common.progress(f"profiling two steps of {o.name} ...")
      results["ours"][-1]["profile"] = profile.summarize(o.step, calls=2)
  if "HF" in labels:
    hf = dict(figures(times[-1], tokens, step_flops[None], peak),
              device=hf_reference.torch_device(), optimizer=args.hf_optimizer)
  results["hf"] = hf
  results["checks"] = checks(results)
  print_summary(results)
  common.write_json(args.json, results)
  return 0


def print_summary(results: Dict[str, Any]) -> None:
  print(f"compiled {len(results['ours'])} train steps in {results['compile_s']:.1f} s (in "
        f"parallel); peak {results['peak_tflops'] or 'unknown'} TFLOP/s")
  rows = results["ours"] + ([dict(results["hf"], name="HF")]
                            if results["hf"] and "skipped" not in results["hf"] else [])
  for r in rows:
    mfu = f"{r['mfu']:.1%}" if r.get("mfu") is not None else "n/a"
    xla = r.get("xla_flops_per_step")
    counted = f" (XLA counts {xla / r['flops_per_step']:.2f}x the model's FLOPs)" if xla else ""
    print(f"{r['name']:>7}: {r['step_s'] * 1e3:9.1f} ms/step (min {r['min_step_s'] * 1e3:.1f}), "
          f"{r['tokens_per_s']:12,.0f} tokens/s, MFU {mfu}{counted}")
  for r in results["ours"]:
    if "profile" in r:
      print(f"{r['name']} per step: " + "\n".join(profile.lines(r["profile"])))
  if results["hf"] and "skipped" in results["hf"]:
    print(f"HF comparison skipped: {results['hf']['skipped']}")
  common.print_checks(results["checks"])


if __name__ == "__main__":
  raise SystemExit(main())
