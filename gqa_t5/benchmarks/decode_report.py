"""The decode benchmark's run order, figures, HF comparison, checks and printed summary."""

from __future__ import annotations

import statistics
import time
from typing import Any, Dict, List, Optional

import jax
import numpy as np

from gqa_t5.benchmarks import bandwidth as bandwidth_lib
from gqa_t5.benchmarks import common, hf_reference
from gqa_t5.benchmarks import decode_run as run_lib
from gqa_t5.benchmarks import profile
from gqa_t5.model import cpu_kernels

# Start-up targets (process start -> first timed decode step), seconds: (shape, warm cache).
# The smoke shape's generous target only exercises the check.
STARTUP_TARGETS = {("L", False): 60.0, ("L", True): 20.0, ("XXL", False): 120.0,
                   ("smoke", False): 120.0, ("smoke", True): 120.0}
MONOTONE_TOLERANCE = 0.03
ROOFLINE_TARGET = 0.5      # MHA's step time / its roofline time
IDEAL_TARGET = 0.8         # every GQA/MQA speed-up / its ideal byte ratio
# Ours vs HF's eager greedy generate, per decode step, by JAX backend. On a GPU HF's eager loop
# is bound by kernel launches; on a CPU both stream the same bytes, so the margin is smaller.
HF_TARGETS = {"gpu": 5.0, "cpu": 2.0}
# An encoder run longer than this is timed once; a shorter one is the best of `repeats` runs.
ENCODE_ONCE_S = 1.0


def measure(args, base, shape: run_lib.RunShape, variants: List[run_lib.DecodeVariant],
            startup: Dict[str, Any], batch_how: str):
  """Runs everything in order; returns (results, input tokens). The encoder and first K's
  functions compile together, from shapes, before any parameter exists."""
  inputs = jax.random.randint(jax.random.PRNGKey(1), (shape.batch, shape.input_length), 2,
                              base.vocab_size)
  encoder = run_lib.CompiledEncoder(base, shape, variants[0].params)
  extra = {"encoder": encoder.lowered}
  first = variants[0]
  startup["compile_first_s"] = run_lib.compile_variants([first], encoder.encoded_shape, inputs,
                                                        extra)
  encoder.compiled = extra["encoder"]
  common.progress("initialising parameters ...")
  start = time.perf_counter()
  mha_params = jax.block_until_ready(run_lib.init_mha_params(base))
  first.set_params(mha_params)
  startup["init_params_s"] = time.perf_counter() - start
  common.progress("encoding ...")
  start = time.perf_counter()
  encoded = jax.block_until_ready(encoder(mha_params, inputs))
  encode_times = [time.perf_counter() - start]
  common.progress(f"timing K={first.num_kv_heads} (first timed decode loop) ...")
  first.run_once(encoded, inputs)
  startup["process_start_to_first_timed_step_s"] = common.since_start()
  startup["first_step_ms"] = first.loop_times.pop() / shape.timed_steps * 1e3
  common.progress(f"first timed decode loop done: {startup['first_step_ms']:.3f} ms per step")
  results = {"benchmark": "decode", "smoke": bool(args.smoke), "shape": args.shape_name,
             "device": common.device_facts(), "config": config_facts(base),
             "cpu_products": (cpu_kernels.status()
                              if common.device_facts()["backend"] == "cpu" else None),
             "run": {"batch": shape.batch, "batch_how": batch_how,
                     "input_length": shape.input_length, "output_length": shape.output_length,
                     "timed_steps": shape.timed_steps,
                     "kv_heads": [v.num_kv_heads for v in variants], "repeats": args.repeats},
             "startup": startup}
  results["checks"] = checks(results, args)
  common.write_json(args.json, results)  # partial: kept if a later stage is killed
  if args.startup_only:
    return results, inputs
  for variant in variants[1:]:
    variant.set_params(mha_params)  # the paper's conversion of the MHA weights
  startup["compile_rest_s"] = run_lib.compile_variants(variants[1:], encoder.encoded_shape, inputs)
  probe = (args.bandwidth_mib * 2**20 if args.bandwidth_mib else
           bandwidth_lib.probe_bytes(results["device"]["memory_bytes_limit"], args.smoke))
  common.progress(f"measuring memory bandwidth ({probe / 2**20:.0f} MiB probe) ...")
  before = bandwidth_lib.measure_bandwidth(probe)
  encode_times += [common.timed(lambda: encoder(first.params, inputs))
                   for _ in range(extra_encoder_runs(encode_times[0], args.repeats))]
  for r in range(args.repeats):
    common.progress(f"timing round {r + 1}/{args.repeats}: K = "
                    + ", ".join(str(v.num_kv_heads) for v in variants) + " ...")
    for variant in variants:  # interleaved, so drift hits every K alike
      variant.run_once(encoded, inputs)
  after = bandwidth_lib.measure_bandwidth(probe)
  bandwidth = max(before, after)
  results["bandwidth"] = {"probe_bytes": probe, "before_bytes_per_s": before,
                          "after_bytes_per_s": after, "used_bytes_per_s": bandwidth}
  results["encode_s"] = min(encode_times)
  results["encode_runs"] = len(encode_times)
  results["per_k"] = [_figures(v, first, shape, bandwidth, min(encode_times)) for v in variants]
  if args.profile:
    for variant, row in zip(variants, results["per_k"]):
      common.progress(f"profiling one decode loop of K={variant.num_kv_heads} ...")
      row["profile"] = variant.profile_loop(encoded, inputs)
  return results, inputs


def extra_encoder_runs(first_run_s: float, repeats: int) -> int:
  """Encoder runs to time after the first: none when it took ENCODE_ONCE_S or more (a long input,
  where re-running it would dominate the benchmark's wall time), else `repeats` (a short run's
  first call carries one-off costs)."""
  return 0 if first_run_s >= ENCODE_ONCE_S else repeats


def config_facts(config) -> Dict[str, Any]:
  """The timed model's sizes, as results record them (the main job's timing stage keeps them
  beside the timed shape, and its report reads them back: `run_results.TimingShape`)."""
  return {"emb_dim": config.emb_dim, "num_heads": config.num_heads, "head_dim": config.head_dim,
          "mlp_dim": config.mlp_dim, "layers": config.num_decoder_layers,
          "vocab_size": config.vocab_size, "dtype": np.dtype(config.dtype).name}


def _figures(v: run_lib.DecodeVariant, mha: run_lib.DecodeVariant, shape, bandwidth: float,
             encode_s: float) -> Dict[str, Any]:
  step = min(v.loop_times) / shape.timed_steps
  return {"kv_heads": v.num_kv_heads, "step_ms_min": step * 1e3,
          "step_ms_median": statistics.median(v.loop_times) / shape.timed_steps * 1e3,
          "bytes_per_step": v.bytes, "roofline_fraction": v.bytes["total"] / step / bandwidth,
          "roofline_step_ms": v.bytes["total"] / bandwidth * 1e3,
          "speedup_vs_mha": min(mha.loop_times) / min(v.loop_times),
          "ideal_speedup": mha.bytes["total"] / v.bytes["total"],
          "time_per_sample_s": (encode_s + step * shape.output_length) / shape.batch}


def compare_hf(base, mha: run_lib.DecodeVariant, shape, args, inputs) -> Dict[str, Any]:
  if not hf_reference.available():
    return {"skipped": "torch and transformers are not installed"}
  dtype = np.dtype(base.dtype).name
  try:
    device = hf_reference.torch_device()
  except RuntimeError as error:
    return {"skipped": str(error)}
  common.progress(f"building HF T5 with the same weights ({dtype}, {device}) ...")
  model = hf_reference.model_from_params(base, mha.params, dtype)
  common.progress(f"timing HF generate ({shape.timed_steps} steps x {args.repeats * 2 + 1}) ...")
  start = time.perf_counter()
  hf = hf_reference.time_generate(model, np.asarray(inputs), shape.timed_steps, args.repeats)
  ours = min(mha.loop_times) / shape.timed_steps
  del model
  return {"device": hf["device"], "step_ms": hf["step_s"] * 1e3,
          "generate_s": hf["generate_s"], "encode_s": hf["encode_s"],
          "ours_step_ms": ours * 1e3, "speedup_ours_vs_hf": hf["step_s"] / ours,
          "token_agreement": hf_reference.token_agreement(mha.tokens, hf["tokens"]),
          "wall_s": time.perf_counter() - start}


def checks(results: Dict[str, Any], args) -> List[Dict[str, Any]]:
  out = []
  startup = results["startup"]
  target = STARTUP_TARGETS.get((results["shape"], bool(startup["cache_warm"])))
  if target is not None:
    seconds = startup["process_start_to_first_timed_step_s"]
    warm = "warm" if startup["cache_warm"] else "cold"
    out.append(common.check(
        f"start-up <= {target:.0f} s ({warm} compilation cache, shape {results['shape']})",
        seconds <= target, f"{seconds:.1f} s from process start to the first timed decode loop "
                           f"(compile {startup['compile_first_s']:.1f} s)"))
  per_k = results.get("per_k")
  if not per_k:
    return out
  if per_k[0]["kv_heads"] == results["config"]["num_heads"]:
    out.append(roofline_check(per_k[0], results["bandwidth"]["used_bytes_per_s"]))
    out.append(ideal_check(per_k))
  out.append(monotone_check(per_k))
  hf = results.get("hf")
  if hf and "skipped" not in hf:
    mha_row = per_k[0] if per_k[0]["kv_heads"] == results["config"]["num_heads"] else None
    out.append(hf_check(hf, results["device"]["backend"],
                        mha_row["roofline_step_ms"] if mha_row else None))
  return out


# The checks, pure functions of the figures (`per_k` rows as `_figures` makes them, K falling).

def roofline_check(mha: Dict[str, Any], bandwidth: float) -> Dict[str, Any]:
  return common.check(
      f"MHA decode step >= {ROOFLINE_TARGET} of the memory roofline",
      mha["roofline_fraction"] >= ROOFLINE_TARGET,
      f"{mha['roofline_fraction']:.2f}: {mha['step_ms_min']:.3f} ms per step, roofline "
      f"{mha['roofline_step_ms']:.3f} ms ({mha['bytes_per_step']['total'] / 1e6:.1f} MB at "
      f"{bandwidth / 1e9:.1f} GB/s)")


def ideal_check(per_k: List[Dict[str, Any]]) -> Dict[str, Any]:
  """Every GQA/MQA row's speed-up over MHA (per_k[0]) against its ideal byte ratio."""
  rows = per_k[1:]
  return common.check(
      f"every GQA/MQA speed-up >= {IDEAL_TARGET:.0%} of its ideal byte ratio",
      all(r["speedup_vs_mha"] >= IDEAL_TARGET * r["ideal_speedup"] for r in rows),
      "; ".join(f"K={r['kv_heads']}: {r['speedup_vs_mha']:.2f}x of {r['ideal_speedup']:.2f}x "
                f"({r['speedup_vs_mha'] / r['ideal_speedup']:.0%})" for r in rows)
      or "no GQA/MQA variant timed")


def monotone_check(per_k: List[Dict[str, Any]]) -> Dict[str, Any]:
  """Each row's step time at most MONOTONE_TOLERANCE above the previous (larger K) row's."""
  times = [r["step_ms_min"] for r in per_k]
  return common.check(
      f"step time never rises as K falls ({MONOTONE_TOLERANCE:.0%} tolerance)",
      all(b <= a * (1 + MONOTONE_TOLERANCE) for a, b in zip(times, times[1:])),
      ", ".join(f"K={r['kv_heads']}: {r['step_ms_min']:.3f} ms" for r in per_k))


def hf_check(hf: Dict[str, Any], backend: str,
             roofline_step_ms: Optional[float] = None) -> Dict[str, Any]:
  """Ours against HF eager generate per step, at this backend's target (HF_TARGETS).

  `roofline_step_ms`: our MHA step's roofline time. HF's step reads at least the same bytes (the
  same weights and caches), so its fraction of that roofline bounds the target: at HF's fraction
  f, the target needs ours at target * f of the roofline, and above 1 no step can meet it.
  """
  target = HF_TARGETS.get(backend, HF_TARGETS["gpu"])
  others = ", ".join(f"{v:g}x on a {k.upper()}" for k, v in HF_TARGETS.items() if k != backend)
  detail = (f"{hf['speedup_ours_vs_hf']:.2f}x: ours {hf['ours_step_ms']:.3f} ms, HF "
            f"{hf['step_ms']:.3f} ms on {hf['device']}; greedy tokens agree at "
            f"{hf['token_agreement']:.0%} of positions")
  if roofline_step_ms:
    fraction = roofline_step_ms / hf["step_ms"]
    detail += (f"; HF's step is at {fraction:.2f} of the memory roofline (it reads at least our "
               f"MHA step's bytes), so {target:g}x needs ours at {target * fraction:.2f}")
  return common.check(
      f"ours >= {target:g}x faster per decode step than HF eager generate on this "
      f"{backend.upper()} (target {others})",
      hf["speedup_ours_vs_hf"] >= target, detail)


def print_summary(results: Dict[str, Any]) -> None:
  s = results["startup"]
  print(f"start-up: {s['process_start_to_first_timed_step_s']:.1f} s from process start to the "
        f"first timed decode loop (parameters {s['init_params_s']:.1f} s, first compile "
        f"{s['compile_first_s']:.1f} s, compilation cache {'warm' if s['cache_warm'] else 'cold'})")
  if results.get("per_k"):
    bw = results["bandwidth"]
    print(f"memory bandwidth: {bw['used_bytes_per_s'] / 1e9:.1f} GB/s (before "
          f"{bw['before_bytes_per_s'] / 1e9:.1f}, after {bw['after_bytes_per_s'] / 1e9:.1f}); "
          f"encoder {results['encode_s']:.3f} s per batch of {results['run']['batch']} (best "
          f"of {results.get('encode_runs', 1)})")
    print(f"{'K':>3} {'ms/step':>9} {'median':>9} {'MB/step':>9} {'roofline':>8} "
          f"{'speed-up':>8} {'ideal':>6} {'of ideal':>8}")
    for r in results["per_k"]:
      print(f"{r['kv_heads']:>3} {r['step_ms_min']:>9.3f} {r['step_ms_median']:>9.3f} "
            f"{r['bytes_per_step']['total'] / 1e6:>9.1f} {r['roofline_fraction']:>8.2f} "
            f"{r['speedup_vs_mha']:>7.2f}x {r['ideal_speedup']:>5.2f}x "
            f"{r['speedup_vs_mha'] / r['ideal_speedup']:>8.0%}")
    for r in results["per_k"]:
      if "profile" in r:
        print(f"K={r['kv_heads']} per step (roofline {r['roofline_step_ms']:.3f} ms): "
              + "\n".join(profile.lines(r["profile"])))
  hf = results.get("hf")
  if hf and "skipped" in hf:
    print(f"HF comparison skipped: {hf['skipped']}")
  common.print_checks(results.get("checks", []))
