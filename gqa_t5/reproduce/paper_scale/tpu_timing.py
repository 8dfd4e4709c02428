"""Table 1 and Figure 6 from programs compiled for TPU v4 (`gqa-t5 compile --timing`).

For each model (T5.1.1-XXL with K in {64, 32, 16, 8, 4, 1}, MHA-Large) at the paper's timing
set-up (input 2048, output 512, 8 chips) and a model axis of 4 or 8 chips, TPU's compiler
compiles the two programs decoding runs:

  encode: the encoder over a batch and the projection of its output into every
          cross-attention cache (once per sequence);
  step:   one cached decode step (the self-attention cache at its full 512 positions, the
          cross-attention keys/values read from the cache, the logits).

`cost_analysis` counts a loop body once, so each program is compiled unrolled with 1 and with 2
layers per stack and extrapolated to the model's depth: per-layer = f(2) - f(1), total = f(1)
+ (L - 1) x per-layer (exact for FLOPs and bytes, which are sums over layers). The batch per
chip is the largest up to `perf_model.Setup.max_batch_per_chip` whose weights and caches fit
the HBM the compiler makes available, less the jobs' headroom (`batch_per_chip`: the
performance model's `fitting_batch_per_chip` within `perf_model.TPU_V4.available_bytes` x
`tpu_topology.HEADROOM_FRACTION`, with the key/value layout the partitioner really uses: K heads
that do not split over the model axis are replicated).

Time per sample (chip-seconds, the paper's measure) = (encode + 512 x step) / batch per chip,
each program taking max(FLOPs / peak, bytes / bandwidth) of the chip (perf_model.TPU_V4): the
project's one performance model applied to the compiler's FLOPs and bytes. XLA's own estimate
(`optimal_seconds`) is shown beside it. Both are estimates, not measurements. The compiled
bytes of a step are checked against the performance model's count (`perf_model.decode_step`):
the compile-level proof at XXL scale that keys/values are never repeated to N heads and
cross-attention keys/values are not re-projected per step.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Callable, Dict, List, Optional, Tuple

import jax
import jax.numpy as jnp

from gqa_t5 import aot
from gqa_t5 import models
from gqa_t5 import partitioning
from gqa_t5 import perf_model
from gqa_t5 import t5x_compat
from gqa_t5 import tpu_topology
from gqa_t5.checkpoints import atomic
from gqa_t5.model import axes
from gqa_t5.model import network
from gqa_t5.model import sizes
from gqa_t5.reproduce.report import paper

TIMING_SLICE = "v4-16"        # 8 chips, the paper's timing set-up
XXL_GROUPS = (64, 32, 16, 8, 4, 1)
MODEL_AXES = (4, 8)
BYTES_TOLERANCE = 0.10


@dataclasses.dataclass(frozen=True)
class TimedModel:
  """One model of Table 1 / Fig. 6 to compile and time, named as the paper names it."""
  name: str
  size: str
  kv_heads: Optional[int]    # None: multi-head

  def config(self, layers: int):
    return sizes.t5_1_1(self.size, num_kv_heads=self.kv_heads, num_cross_kv_heads=self.kv_heads,
                        num_encoder_layers=layers, num_decoder_layers=layers, dropout_rate=0.0)


def timed_models() -> List[TimedModel]:
  """MHA-Large, then XXL for each K of XXL_GROUPS, named as the paper names them."""
  out = [TimedModel(paper.model_name("large", None, sizes.t5_1_1("large").num_heads), "large",
                    None)]
  n = sizes.t5_1_1("xxl").num_heads
  for k in XXL_GROUPS:
    out.append(TimedModel(paper.model_name("xxl", k, n), "xxl", None if k == n else k))
  return out


def _bf16(tree):
  # Decoding reads bfloat16 weights (the performance model's bytes_per_value = 2).
  return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, jnp.bfloat16, sharding=s.sharding)
                      if jnp.issubdtype(s.dtype, jnp.floating) else s, tree)


def lower_programs(config, model_axis: int, batch: int, setup: perf_model.Setup,
                   devices) -> Dict[str, object]:
  """The encode and step programs of a `T5Config`, lowered for a (devices / model_axis,
  model_axis) mesh of `devices` at global batch `batch` and the lengths of `setup`."""
  model = models.EncoderDecoderModel(network.Transformer(config))
  partitioner = partitioning.Partitioner(data_parallel=-1, model_parallel=model_axis,
                                         devices=devices)
  params = _bf16(aot.abstract_params(model, partitioner))
  s, t = setup.input_length, setup.output_length
  data = partitioner.data_sharding(2)
  tokens = jax.ShapeDtypeStruct((batch, s), jnp.int32, sharding=data)
  with partitioner.mesh, partitioner.axis_rules():
    cache_shapes = jax.eval_shape(lambda p: model.init_cache(p, batch, s, t), params)
    cache_axes = t5x_compat.cache_logical_axes(cache_shapes)
    cache = jax.tree.map(lambda c, a: jax.ShapeDtypeStruct(c.shape, c.dtype,
                                                           sharding=partitioner.sharding(a)),
                         cache_shapes, cache_axes)

    def encode(p, inputs):
      encoded = model.module.apply({"params": p}, inputs, enable_dropout=False,
                                   method=model.module.encode)
      return model.prefill_cross_attention(p, model.init_cache(p, batch, s, t), encoded, inputs)

    def step(p, inputs, token, c):
      encoded = jnp.zeros((batch, s, model.module.config.emb_dim), jnp.bfloat16)
      return model.tokens_to_logits_fn(p, encoded, inputs)(token, c)

    token = jax.ShapeDtypeStruct((batch, 1), jnp.int32, sharding=data)
    return {"encode": jax.jit(encode).lower(params, tokens),
            "step": jax.jit(step, donate_argnums=(3,)).lower(params, tokens, token, cache)}


def _extrapolate(one: aot.ProgramFigures, two: aot.ProgramFigures, layers: int) -> Dict:
  out = {}
  for field in ("flops", "bytes_accessed", "xla_seconds", "argument_bytes", "temp_bytes"):
    a, b = getattr(one, field), getattr(two, field)
    if a is None or b is None:
      out[field] = None
    else:
      out[field] = a + (layers - 1) * (b - a)
  return out


def _phase_seconds(figures: Dict, chip: perf_model.Chip) -> float:
  return max(figures["flops"] / chip.peak_flops, figures["bytes_accessed"] / chip.hbm_bytes_per_s)


def full_config(timed: TimedModel):
  """The model's `T5Config` at its size's depth."""
  return timed.config(sizes.t5_1_1(timed.size).num_decoder_layers)


def model_setup(timed: TimedModel, model_axis: int,
                setup: perf_model.Setup) -> perf_model.Setup:
  """`setup` on a model axis of `model_axis` chips, with the key/value layout the partitioner
  uses (`axes.kv_heads_sharded`): K heads that do not split over the model axis are held whole
  on every chip of it ('replicated'); heads that split are labelled 'ideal' (either layout then
  counts one copy)."""
  config = full_config(timed)
  sharded = axes.kv_heads_sharded(config.self_attention_kv_heads,
                                  config.cross_attention_kv_heads, model_axis)
  return dataclasses.replace(setup, model_parallel=model_axis,
                             kv_layout="ideal" if sharded else "replicated")


def batch_per_chip(timed: TimedModel, model_axis: int, setup: perf_model.Setup,
                   chip: perf_model.Chip = perf_model.TPU_V4) -> int:
  """The largest batch per chip (up to `setup.max_batch_per_chip`) whose weights and caches fit
  the HBM the compiler makes available to a program, within the jobs' headroom."""
  return perf_model.fitting_batch_per_chip(
      full_config(timed), model_setup(timed, model_axis, setup), chip,
      memory_bytes=chip.available_bytes * tpu_topology.HEADROOM_FRACTION)


def time_model(timed: TimedModel, model_axis: int, devices, setup: perf_model.Setup,
               chip: perf_model.Chip = perf_model.TPU_V4, cache_dir: Optional[str] = None
               ) -> Dict:
  """Compiled figures, the time per sample and the performance model's figures of one model
  (each program's figures kept in `cache_dir`, by program, when given)."""
  full = full_config(timed)
  timed_setup = model_setup(timed, model_axis, setup)
  per_chip = batch_per_chip(timed, model_axis, setup, chip)
  batch = per_chip * setup.chips
  compiled = {}
  for layers in (1, 2):
    lowered = lower_programs(timed.config(layers), model_axis, batch, setup, devices)
    compiled[layers] = {name: aot.compile_figures(low, cache_dir, context=TIMING_SLICE)
                        for name, low in lowered.items()}
  result = {"name": timed.name, "kv_heads": full.self_attention_kv_heads,
            "model_axis": model_axis, "kv_layout": timed_setup.kv_layout,
            "batch_per_chip": per_chip, "global_batch": batch}
  for program in ("encode", "step"):
    one, two = compiled[1][program], compiled[2][program]
    if not (one.compiled and two.compiled):
      raise ValueError(f"{timed.name}: the {program} program does not compile at batch "
                       f"{batch}: {one.error or two.error}")
    result[program] = _extrapolate(one, two, full.num_decoder_layers)
  t = setup.output_length
  encode_s = _phase_seconds(result["encode"], chip)
  step_s = _phase_seconds(result["step"], chip)
  result["seconds_per_sample"] = (encode_s + t * step_s) / per_chip
  xla = [result[p]["xla_seconds"] for p in ("encode", "step")]
  result["xla_seconds_per_sample"] = (None if None in xla
                                      else (xla[0] + t * xla[1]) / per_chip)
  model = perf_model.time_per_sample(full, timed_setup, chip, per_chip)
  model_step = perf_model.decode_step(full, timed_setup, chip, per_chip)
  result["model_seconds_per_sample"] = model["total"]
  result["model_step_bytes"] = model_step["bytes"]
  result["step_bytes_ratio"] = result["step"]["bytes_accessed"] / model_step["bytes"]
  result["step_argument_ratio"] = result["step"]["argument_bytes"] / model_step["bytes"]
  return result


def run(devices=None, setup: perf_model.Setup = perf_model.Setup(),
        model_axes: Tuple[int, ...] = MODEL_AXES, names: Optional[List[str]] = None,
        log: Callable[[str], None] = print,
        on_row: Optional[Callable[[Dict], None]] = None,
        cache_dir: Optional[str] = None) -> Dict:
  """Every model on every model axis; `on_row(result so far)` after each (the full set takes
  an hour or more of compiles on a small CPU, so partial results are kept)."""
  devices = devices if devices is not None else tpu_topology.slice_devices(TIMING_SLICE)
  setup = dataclasses.replace(setup, chips=len(devices))
  rows = []
  result = {"setup": dataclasses.asdict(setup), "chip": dataclasses.asdict(perf_model.TPU_V4),
            "rows": rows}
  for model_axis in model_axes:
    for timed in timed_models():
      if names and timed.name not in names:
        continue
      row = time_model(timed, model_axis, devices, setup, cache_dir=cache_dir)
      log(f"  model axis {model_axis}: {timed.name:<12} batch/chip {row['batch_per_chip']:>2} "
          f"{row['seconds_per_sample'] * 1e3:8.1f} chip-ms/sample (performance model "
          f"{row['model_seconds_per_sample'] * 1e3:.1f}); step bytes {row['step_bytes_ratio']:.3f}x"
          f" the model's")
      rows.append(row)
      if on_row is not None:
        on_row(result)
  return result


def bytes_checks(result: Dict) -> List[str]:
  """One PASS/FAIL line per row: the compiled decode step's inputs (the weights it reads and
  its K-head caches, unused arguments pruned by jit) within BYTES_TOLERANCE of the bytes the
  performance model says a step must read; and, as information, XLA's bytes accessed."""
  lines = []
  for row in result["rows"]:
    ok = abs(row["step_argument_ratio"] - 1.0) <= BYTES_TOLERANCE
    lines.append(f"{'PASS' if ok else 'FAIL'} {row['name']} (model axis {row['model_axis']}, "
                 f"K={row['kv_heads']} {row['kv_layout']}): the compiled step's inputs per "
                 f"chip {row['step']['argument_bytes'] / 2 ** 20:.1f} MiB = "
                 f"{row['step_argument_ratio']:.3f}x the performance model's "
                 f"{row['model_step_bytes'] / 2 ** 20:.1f} MiB (tolerance "
                 f"{BYTES_TOLERANCE:.0%}); XLA's bytes accessed "
                 f"{row['step_bytes_ratio']:.2f}x")
  return lines


def table1_markdown(result: Dict) -> str:
  paper_s = paper.table1_seconds()
  lines = []
  for axis in sorted({r["model_axis"] for r in result["rows"]}):
    rows = {r["name"]: r for r in result["rows"] if r["model_axis"] == axis}
    base = rows.get("MHA-XXL")
    lines += [f"### Model axis {axis} ({8 // axis} x {axis} mesh of 8 TPU v4 chips)", "",
              "| model | K | key/value layout | batch per chip | compiled (chip-ms/sample) | "
              "ratio to MHA-XXL | XLA estimate (chip-ms) | performance model (chip-ms) | "
              "paper (s) | paper ratio |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in rows.items():
      ratio = r["seconds_per_sample"] / base["seconds_per_sample"] if base else float("nan")
      p = paper_s.get(name)
      p_ratio = p / paper_s["MHA-XXL"] if p else None
      xla = r["xla_seconds_per_sample"]
      lines.append(f"| {name} | {r['kv_heads']} | {r['kv_layout']} | {r['batch_per_chip']} | "
                   f"{r['seconds_per_sample'] * 1e3:.1f} | {ratio:.3f} | "
                   f"{'n/a' if xla is None or xla <= 0 else f'{xla * 1e3:.1f}'} | "
                   f"{r['model_seconds_per_sample'] * 1e3:.1f} | "
                   f"{'-' if p is None else f'{p:.2f}'} | "
                   f"{'-' if p_ratio is None else f'{p_ratio:.3f}'} |")
    lines.append("")
  return "\n".join(lines)


def figure6(result: Dict, path: str) -> None:
  import matplotlib  # pylint: disable=g-import-not-at-top  # heavy, optional
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, ax = plt.subplots(figsize=(6, 4))
  for axis in sorted({r["model_axis"] for r in result["rows"]}):
    rows = sorted((r for r in result["rows"] if r["model_axis"] == axis and "XXL" in r["name"]),
                  key=lambda r: r["kv_heads"])
    ax.plot([r["kv_heads"] for r in rows], [r["seconds_per_sample"] for r in rows], "o-",
            label=f"compiled, model axis {axis}")
    ax.plot([r["kv_heads"] for r in rows], [r["model_seconds_per_sample"] for r in rows], "x:",
            label=f"performance model, model axis {axis}")
  points = paper.xxl_seconds()
  ax.plot(list(points), list(points.values()), "s--", color="black",
          label="paper (Table 1, measured)")
  ax.set_xscale("log", base=2)
  ax.set_xlabel("key/value groups K (T5.1.1-XXL, 64 query heads)")
  ax.set_ylabel("time per sample (chip-s)")
  ax.set_title("Fig. 6 from TPU v4 compiled programs (estimates)\ninput 2048, output 512, 8 chips")
  ax.legend(fontsize=7)
  fig.tight_layout()
  atomic.save_figure(fig, path, dpi=120)
  plt.close(fig)


def merged(previous: Optional[Dict], result: Dict) -> Dict:
  """`result` with the rows of `previous` it does not redo (another model or model axis),
  when both were computed for the same set-up and chip; rows by model axis, then model."""
  if not previous or (previous.get("setup"), previous.get("chip")) != (result["setup"],
                                                                        result["chip"]):
    return result
  done = {(r["name"], r["model_axis"]) for r in result["rows"]}
  rows = [r for r in previous["rows"] if (r["name"], r["model_axis"]) not in done]
  order = {v.name: i for i, v in enumerate(timed_models())}
  rows = sorted(rows + result["rows"], key=lambda r: (r["model_axis"], order.get(r["name"], 99)))
  return {**result, "rows": rows}


def write(out: str, result: Dict) -> None:
  """timing.json, timing.md and fig6.png in `out`, keeping the rows an earlier run wrote there
  for other models or model axes (the full set is hours of compiles: runs add to it)."""
  os.makedirs(out, exist_ok=True)
  path = os.path.join(out, "timing.json")
  if os.path.exists(path):
    with open(path, encoding="utf-8") as f:
      result = merged(json.load(f), result)
  atomic.write_text(path, json.dumps(result, indent=1))
  chip = perf_model.TPU_V4
  text = ["# Table 1 and Fig. 6 from TPU v4 compiled programs", "",
          "Written by `gqa-t5 compile --timing --out DIR` (see "
          "gqa_t5/reproduce/paper_scale/tpu_timing.py). Input 2048, output 512, 8 TPU v4 "
          "chips, bfloat16 weights and caches; the batch per chip is the largest up to "
          f"{result['setup']['max_batch_per_chip']} whose weights and caches fit "
          f"{tpu_topology.HEADROOM_FRACTION:.0%} of the {chip.available_bytes / 2 ** 30:.2f} GiB "
          "the compiler makes available. Every time here is an ESTIMATE from the "
          f"compiled programs' FLOPs and bytes (max of FLOPs / {chip.peak_flops / 1e12:.0f} "
          f"TFLOP/s and bytes / {chip.hbm_bytes_per_s / 1e12:.1f} TB/s per program), or XLA's "
          "own estimate, or the performance model's: none is "
          "a measurement. The paper's column is its measurement (xprof on TPU v4). XLA's "
          "`optimal_seconds` came out negative for these programs (n/a).", "",
          table1_markdown(result), "## Bytes per decode step: compiled vs performance model",
          "", *[f"- {line}" for line in bytes_checks(result)], ""]
  atomic.write_text(os.path.join(out, "timing.md"), "\n".join(text))
  figure6(result, os.path.join(out, "fig6.png"))
