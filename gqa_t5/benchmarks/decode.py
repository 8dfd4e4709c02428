"""Greedy decoding speed per key/value head count K against this device's memory roofline.

For each K it times the steady decode loop (encoder and cross-attention prefill timed apart),
interleaving the runs of different K, and reports ms per step, the bytes a step must read
(decoder weights + self-attention cache + cross-attention keys/values, from the config), the
fraction of the memory roofline reached (bandwidth measured in the same run, a read-dominated
probe), the speed-up over MHA beside the ideal byte ratio, and PASS/FAIL checks: MHA step >= 0.5
of the roofline, every speed-up >= 80% of its ideal, time never rising as K falls. With
--compare-hf, HF transformers' eager greedy `generate` runs on the same device, weights and
dtype, and ours must be faster per step by the device's target (`decode_report.HF_TARGETS`: 5x
on a GPU, 2x on a CPU). Start-up (process start to the first timed step) and compile time are
reported apart; compilations are cached on disk. The encoder does not depend on K: it is timed
once (best of several runs only when one run is short).

  gqa-t5 benchmark-decode --shape L --compare-hf        (T5.1.1-Large, K 16, 8, 4, 1)
  gqa-t5 benchmark-decode --shape XXL                   (K 64 ... 1, batch fitted to memory)
  gqa-t5 benchmark-decode --shape CPU --compare-hf      (issue 23's CPU shape, K 8, 4, 2, 1)
  gqa-t5 benchmark-decode --shape CPU-long --compare-hf (input 2048: cross-attention dominates)
  gqa-t5 benchmark-decode --smoke --compare-hf --json out.json   (tiny, seconds on a CPU)
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from typing import Any, Dict, Optional, Tuple

import jax
import numpy as np

from gqa_t5 import jax_setup
from gqa_t5 import perf_model
from gqa_t5.benchmarks import common, decode_report
from gqa_t5.benchmarks import decode_run as run_lib
from gqa_t5.model import cpu_kernels, grouping, sizes
from gqa_t5.model.config import T5Config


@dataclasses.dataclass(frozen=True)
class Preset:
  size: str
  input_length: int
  output_length: int
  batch: Optional[int]        # None: the largest that fits the device's memory
  kv_heads: Tuple[int, ...]
  timed_steps: Optional[int] = None  # None: output_length
  dtype: str = "bfloat16"
  dims: Tuple[Tuple[str, int], ...] = ()  # T5Config fields overriding the named size's


# The CPU shapes' model: T5.1.1-Small's width with 8 heads of 64 (not 6, so that K = 4 and 2 are
# real groups) and 6 layers per stack, the model of issue 23's command.
_CPU_MODEL = (("num_heads", 8), ("num_encoder_layers", 6), ("num_decoder_layers", 6))


# The benchmark run shapes (model dimensions come from gqa_t5/model/sizes.py).
PRESETS = {
    "L": Preset("large", 2048, 128, 32, (16, 8, 4, 1)),
    # Fig. 6's lengths. Each step reads the whole 512-long self-attention cache whatever the
    # position, so 64 timed steps give the per-step time of all 512 at an eighth of the wait.
    "XXL": Preset("xxl", 2048, 512, None, (64, 32, 16, 8, 4, 1), timed_steps=64),
    # A quiet 2-core CPU, float32. CPU: weights 141 MB, caches 126 MB of a step's 267 at K = N.
    "CPU": Preset("small", 512, 128, 8, (8, 4, 2, 1), dtype="float32", dims=_CPU_MODEL),
    # Long inputs: the cross-attention keys/values are 71% of a step's bytes at K = N (403 of
    # 569 MB). Every step reads the whole caches, so 32 timed steps give the per-step time; the
    # encoder (8 x 2048 tokens) runs once. A few minutes on 2 cores.
    "CPU-long": Preset("small", 2048, 128, 8, (8, 4, 2, 1), timed_steps=32,
                       dtype="float32", dims=_CPU_MODEL),
    "smoke": Preset("tiny", 32, 8, 2, (8, 2, 1), dtype="float32"),
}
_DIMS = {"emb_dim": "emb_dim", "num_heads": "num_heads", "head_dim": "head_dim",
         "mlp_dim": "mlp_dim", "vocab": "vocab_size"}


def parse_args(argv=None):
  parser = argparse.ArgumentParser(prog="gqa-t5 benchmark-decode", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--shape", choices=tuple(n for n in PRESETS if n != "smoke"), default="L",
                      help="named run shape (flags below override its fields)")
  common.add_common_flags(parser)
  parser.add_argument("--size", choices=sizes.NAMES, default=None,
                      help="named model size (default: the shape's); flags below override")
  for name in ("emb_dim", "num_heads", "head_dim", "mlp_dim", "layers", "vocab",
               "input_length", "output_length", "batch", "timed_steps"):
    parser.add_argument("--" + name.replace("_", "-"), type=common.positive_int, default=None)
  parser.add_argument("--dtype", choices=("float32", "bfloat16"), default=None)
  parser.add_argument("--kv-heads", default=None, help="comma-separated K (default: preset's)")
  parser.add_argument("--repeats", type=common.positive_int, default=None,
                      help="timed loops per K")
  parser.add_argument("--encode-batch", type=common.positive_int, default=8,
                      help="rows per encoder call")
  parser.add_argument("--memory-fraction", type=float, default=0.8,
                      help="share of free device memory the fitted batch may use for caches")
  parser.add_argument("--bandwidth-mib", type=common.positive_int, default=None,
                      help="size of the bandwidth probe (default: sized for the device)")
  parser.add_argument("--compare-hf", action="store_true",
                      help="also time HF transformers' greedy generate (same device, weights)")
  parser.add_argument("--profile", action="store_true",
                      help="after timing, trace one decode loop per K and print where its time "
                           "goes (operations per step, device busy vs idle, the top ones)")
  parser.add_argument("--startup-only", action="store_true",
                      help="stop after the first timed step of the first K (start-up figures)")
  args = parser.parse_args(argv)
  args.preset = PRESETS["smoke" if args.smoke else args.shape]
  args.shape_name = shape_name(args)
  args.repeats = args.repeats or (2 if args.smoke else 3)
  return args, parser


# Flags that change the named shape's model or run: its targets (start-up) no longer apply.
_SHAPE_FLAGS = tuple(_DIMS) + ("size", "layers", "input_length", "output_length", "batch",
                               "dtype")


def shape_name(args) -> str:
  """'smoke', the named shape, or 'custom (from NAME)' when flags changed what it runs."""
  if args.smoke:
    return "smoke"
  if any(getattr(args, flag) is not None for flag in _SHAPE_FLAGS):
    return f"custom (from {args.shape})"
  return args.shape


def build_config(args, parser):
  overrides = dict(args.preset.dims) if args.size is None else {}
  overrides.update({field: getattr(args, flag) for flag, field in _DIMS.items()
                    if getattr(args, flag) is not None})
  if args.layers is not None:
    overrides.update(num_encoder_layers=args.layers, num_decoder_layers=args.layers)
  dtype = args.dtype or args.preset.dtype
  config = sizes.t5_1_1(args.size or args.preset.size, dtype=dtype, dropout_rate=0.0,
                        **overrides)
  n = config.num_heads
  if args.kv_heads:
    kv_heads = [int(k) for k in args.kv_heads.split(",")]
  elif (overrides and overrides != dict(args.preset.dims)) or args.size:
    kv_heads = [k for k in grouping.valid_kv_heads(n) if k in (n, n // 2, n // 4, n // 8, 1)]
  else:
    kv_heads = list(args.preset.kv_heads)
  for k in kv_heads:
    if k not in grouping.valid_kv_heads(n):
      parser.error(f"--kv-heads value {k} does not divide num_heads={n}")
  kv_heads = sorted(set(kv_heads), reverse=True)
  return config, kv_heads


@dataclasses.dataclass(frozen=True)
class Request:
  """One benchmark run, typed: what `main` makes of the flags, and what the main job's timing
  stage (`reproduce/pipeline/timing.py`) passes directly.

  `config` is the MHA model (its num_kv_heads is ignored); each K in `kv_heads` (falling) is its
  paper conversion. `batch` None fits the largest batch to the device's memory.
  """
  config: T5Config
  kv_heads: Tuple[int, ...]
  input_length: int
  output_length: int
  batch: Optional[int]
  timed_steps: Optional[int] = None        # None: output_length
  repeats: int = 3
  encode_batch: int = 8
  memory_fraction: float = 0.8
  bandwidth_mib: Optional[int] = None      # None: sized for the device
  compare_hf: bool = False
  startup_only: bool = False
  profile: bool = False
  smoke: bool = False
  shape_name: str = "custom"
  json: Optional[str] = None
  jax_cache_dir: Optional[str] = common.DEFAULT_CACHE_DIR


def request_from_args(args, parser) -> Request:
  config, kv_heads = build_config(args, parser)
  if args.compare_hf and kv_heads[0] != config.num_heads:
    parser.error(f"--compare-hf needs K = num_heads = {config.num_heads} among --kv-heads")
  p = args.preset
  output_length = args.output_length or p.output_length
  return Request(
      config=config, kv_heads=tuple(kv_heads), input_length=args.input_length or p.input_length,
      output_length=output_length, batch=args.batch or p.batch,
      timed_steps=args.timed_steps or p.timed_steps, repeats=args.repeats,
      encode_batch=args.encode_batch, memory_fraction=args.memory_fraction,
      bandwidth_mib=args.bandwidth_mib, compare_hf=args.compare_hf,
      startup_only=args.startup_only, profile=args.profile, smoke=args.smoke,
      shape_name=args.shape_name,
      json=args.json, jax_cache_dir=args.jax_cache_dir)


def run_shape(request: Request, params_bytes: int) -> Tuple[run_lib.RunShape, str]:
  """The run's batch and lengths, and how the batch was chosen."""
  config, s, t = request.config, request.input_length, request.output_length
  steps = min(request.timed_steps or t, t)
  batch, how = request.batch, "given"
  if batch is None:
    limit = common.device_facts()["memory_bytes_limit"]
    if not limit:
      raise SystemExit("no --batch given and this device reports no memory limit to fit one")
    mha = config.replace(num_kv_heads=None)
    itemsize = np.dtype(config.dtype).itemsize
    # The pooled key/value kernels (self and cross) of every GQA/MQA variant.
    params_bytes += sum(4 * config.num_decoder_layers * config.emb_dim * k * config.head_dim
                        * itemsize for k in request.kv_heads if k != config.num_heads)
    # Prefilling may hold a second copy of the caches; the encoded batch stays alive. The
    # encoder's attention buffers (chunks of --encode-batch rows) are gone by then.
    per_sequence = (2 * sum(perf_model.cache_bytes(mha, s, t).values())
                    + s * config.emb_dim * itemsize)
    batch = perf_model.fit_batch(per_sequence, params_bytes, limit, request.memory_fraction,
                                 multiple=8)
    how = (f"fitted: {limit / 2**30:.1f} GiB limit, {params_bytes / 2**30:.1f} GiB weights, "
           f"{per_sequence / 2**30:.2f} GiB per sequence, {request.memory_fraction:.0%} usable")
  return run_lib.RunShape(batch, s, t, steps, request.encode_batch), how


def run(request: Request) -> Dict[str, Any]:
  """Times the request, prints the summary (and writes `request.json`); returns the results:
  per-K figures, bandwidth, start-up, the HF comparison and the checks."""
  cache_dir = jax_setup.enable_compilation_cache(request.jax_cache_dir)
  cached = len(os.listdir(cache_dir)) if cache_dir else 0
  config, kv_heads = request.config, list(request.kv_heads)
  facts = common.device_facts()
  common.progress(f"{facts['backend']} ({facts['device_kind']}); model {config.emb_dim}d "
                  f"{config.num_heads}x{config.head_dim} heads, mlp {config.mlp_dim}, "
                  f"{config.num_decoder_layers} layers, {np.dtype(config.dtype).name}; K "
                  f"{kv_heads}; compilation cache {cache_dir} ({cached} entries)")
  if facts["backend"] == "cpu":
    common.progress(f"decode-step products on this CPU: {cpu_kernels.status()}")
  base = config.replace(num_kv_heads=None)
  abstract = run_lib.abstract_mha_params(base)
  params_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(abstract))
  shape, how = run_shape(request, params_bytes)
  common.progress(f"batch {shape.batch} ({how}), input {shape.input_length}, caches for "
                  f"{shape.output_length} steps, {shape.timed_steps} timed steps per loop")
  variants = [run_lib.DecodeVariant(base, k, shape, abstract) for k in kv_heads]
  results, inputs = decode_report.measure(
      request, base, shape, variants, batch_how=how,
      startup={"cache_dir": cache_dir, "cache_entries_before": cached, "cache_warm": cached > 0})
  if request.compare_hf and not request.startup_only:
    results["hf"] = decode_report.compare_hf(base, variants[0], shape, request, inputs)
  results["checks"] = decode_report.checks(results, request)
  decode_report.print_summary(results)
  common.write_json(request.json, results)
  return results


def main(argv=None) -> int:
  args, parser = parse_args(argv)
  run(request_from_args(args, parser))
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
