"""Stage 6: gather every stage's numbers into the typed results (`run_results.Results`, written
as results.json), then write table1.md, fig3-6.png and REPORT.md from them (`write_all` needs
nothing but the results, so outputs can be redrawn from a results.json alone: `gqa-t5 reproduce
--redraw DIR`)."""

from __future__ import annotations

import json
import os
import platform
from typing import Callable, Dict, List, Optional

import jax

from gqa_t5 import perf_model
from gqa_t5.checkpoints import atomic
from gqa_t5.model import grouping
from gqa_t5.model.config import T5Config
from gqa_t5.reproduce.paper_scale import timing_sim
from gqa_t5.reproduce.pipeline import estimate
from gqa_t5.reproduce.pipeline import presets as presets_lib
from gqa_t5.reproduce.pipeline import stage_table
from gqa_t5.reproduce.pipeline import tasks
from gqa_t5.reproduce.pipeline import variants as variants_lib
from gqa_t5.reproduce.report import claims as claims_lib
from gqa_t5.reproduce.report import figures
from gqa_t5.reproduce.report import markdown
from gqa_t5.reproduce.report import paper
from gqa_t5.reproduce.report import run_results as rr

RESULTS_FILE = "results.json"


def average(main_scores: Dict[str, float]) -> float:
  """The unweighted mean of the tasks' main metrics (the paper's 'Average')."""
  return sum(main_scores[t] for t in presets_lib.TASKS) / len(presets_lib.TASKS)


def main_scores(scores: Dict[str, Dict[str, float]]) -> Dict[str, float]:
  out = {}
  for task in presets_lib.TASKS:
    metric = presets_lib.MAIN_METRIC[task]
    if task not in scores or metric not in scores[task]:
      raise KeyError(f"evaluation of {task} has no {metric!r}; it has "
                     f"{sorted(scores.get(task, {}))}")
    out[task] = float(scores[task][metric])
  return out


def mean_loss(scores: Dict[str, Dict[str, float]]) -> Optional[float]:
  """The mean over tasks of the teacher-forced cross-entropy per token (None if not measured)."""
  values = [scores[t]["loss"] for t in presets_lib.TASKS if "loss" in scores.get(t, {})]
  return sum(values) / len(values) if len(values) == len(presets_lib.TASKS) else None


def machine_description() -> str:
  cores = os.cpu_count() or 0
  backend = jax.default_backend()
  text = f"{platform.machine()} with {cores} CPU core{'s' if cores != 1 else ''} (JAX {backend}"
  if backend == "gpu":
    text += f", {jax.devices()[0].device_kind}"
  return text + ")"


def model_params(model: T5Config) -> int:
  return perf_model.total_params(model.replace(num_kv_heads=None))


def pretrain_throughput(pretrain: Dict, model: T5Config,
                        lengths: Dict[str, int]) -> rr.Throughput:
  """Tokens/s of the pretraining run (compile excluded where measured) and, on a GPU, its MFU
  against the H200's dense bf16 peak. FLOPs per token: the model's FLOPs of a training example
  of the pretraining `lengths` (`perf_model.train_step_flops`) over its inputs + targets tokens.
  A CPU has no peak in the machine table (its figure is a fitted sustained rate), so there MFU
  is None."""
  tokens_per_s = pretrain.get("steady_tokens_per_second", pretrain.get("tokens_per_second"))
  on_gpu = jax.default_backend() == "gpu"
  machine = estimate.MACHINES["h200" if on_gpu else "cpu"]
  flops_per_token = perf_model.train_step_flops(
      model.replace(num_kv_heads=None), batch=1, input_length=lengths["inputs"],
      target_length=lengths["targets"]) / (lengths["inputs"] + lengths["targets"])
  mfu = flops_per_token * tokens_per_s / machine.peak_flops if tokens_per_s and on_gpu else None
  return rr.Throughput(tokens_per_second=tokens_per_s,
                       compile_excluded="steady_tokens_per_second" in pretrain,
                       flops_per_token=flops_per_token, peak_flops=machine.peak_flops,
                       peak_name=machine.name, mfu=mfu)


def paper_timing_rows(measured: Optional[Dict], sim: rr.PaperScaleRoofline
                      ) -> Optional[rr.PaperTimingTable]:
  """Per paper-shape model: measured s/sample, the roofline here (on a GPU: the H200's) and on
  TPU v4, the paper's. `measured`: the paper-timing stage's result, a timing per model size."""
  if not measured:
    return None
  chip = perf_model.H200 if jax.default_backend() == "gpu" else None
  runs = {size: rr.DecodeTiming.from_json(run) for size, run in sorted(measured["runs"].items())}
  rows = {}
  for size, run in runs.items():  # large, then xxl
    shape = run.shape
    for k in run.ks():
      name = paper.model_name(size, k, shape.num_heads)
      here = None
      if chip is not None:
        setup = perf_model.Setup(chips=1, model_parallel=1, max_batch_per_chip=shape.batch,
                                 input_length=shape.input_length,
                                 output_length=shape.output_length,
                                 bytes_per_value=perf_model.value_bytes(run.dtype))
        here = perf_model.time_per_sample(shape.config(k), setup, chip,
                                          batch_per_chip=shape.batch)["total"]
      tpu = sim.groups_xxl.get(str(k)) if size == "xxl" else sim.table1.get(name)
      rows[name] = rr.PaperTimingRow(
          measured=run.of(k).time_per_sample, roofline_here=here, roofline_tpu=tpu,
          paper=paper.TABLE1.get(name, {}).get("time"), size=size, kv_heads=k)
  first = next(iter(runs.values()))
  return rr.PaperTimingTable(
      rows=rows, batch=first.shape.batch, dtype=first.dtype,
      input_length=first.shape.input_length, output_length=first.shape.output_length,
      bandwidth_bytes_per_s=measured["bandwidth_bytes_per_s"])


def noise_summary(variants: List[rr.VariantResult],
                  preset: presets_lib.ReproducePreset) -> rr.Noise:
  """Seed-to-seed changes of the repeated comparison's averages."""
  by_key = {(v.kv_heads, v.method, v.alpha, v.seed): v for v in variants}
  pairs, diffs, loss_changes = [], [], []
  for seed in preset.noise_seeds:
    for k in (1, preset.gqa_kv_heads):
      base, other = by_key.get((k, "mean", 0.0, 0)), by_key.get((k, "mean", 0.0, seed))
      if base is None or other is None:
        continue
      pairs.append(rr.NoisePair(label=f"{base.short_label} alpha 0 seed 0 vs seed {seed}",
                                seed0=base.average, other=other.average,
                                change=abs(base.average - other.average)))
      if base.loss is not None and other.loss is not None:
        loss_changes.append(abs(base.loss - other.loss))
    mqa0 = by_key.get((1, "mean", 0.0, 0))
    gqa0 = by_key.get((preset.gqa_kv_heads, "mean", 0.0, 0))
    mqa = by_key.get((1, "mean", 0.0, seed))
    gqa = by_key.get((preset.gqa_kv_heads, "mean", 0.0, seed))
    if None not in (mqa0, gqa0, mqa, gqa):
      diffs.append(rr.NoiseDifference(seed=seed,
                                      gqa_minus_mqa_seed0=gqa0.average - mqa0.average,
                                      gqa_minus_mqa=gqa.average - mqa.average))
  return rr.Noise(average=max((p.change for p in pairs), default=None), pairs=pairs,
                  differences=diffs, loss=max(loss_changes, default=None))


def _variant_record(item: Dict, preset: presets_lib.ReproducePreset, timing: rr.DecodeTiming,
                    n: int) -> rr.VariantResult:
  """One fine-tuned variant's row of results.json: its scores, losses and time."""
  v = item["variant"]
  mains = main_scores(item["scores"])
  t = timing.of(v.kv_heads)
  return rr.VariantResult(
      key=v.key(n), label=v.label(n), short_label=grouping.kv_label(v.kv_heads, n),
      attention=v.attention_name(n), kv_heads=v.kv_heads, method=v.method, alpha=v.alpha,
      seed=v.seed, uptrain_steps=preset.uptrain_steps(v.alpha) if v.kv_heads != n else 0,
      finetune=item.get("finetune", {}), scores=item["scores"], main_scores=mains,
      average=average(mains), loss=mean_loss(item["scores"]),
      start_loss=item.get("start_loss"), time_per_sample=t.time_per_sample,
      time_per_step=t.time_per_step)


def _summaries(results: rr.Results, preset: presets_lib.ReproducePreset):
  """(Table 1's headline rows, Fig. 4's methods, Fig. 5's alpha curves) of seed 0."""
  find = results.find
  n = results.scale.num_heads
  a = preset.method_alpha
  headline = [x for x in [find(n), find(1, "mean", a), find(preset.gqa_kv_heads, "mean", a)]
              + [find(k, "mean", a) for k in preset.extra_kv_heads] if x is not None]
  methods = []
  for method in presets_lib.METHODS:
    v = find(1, method, a)
    if v is not None:
      methods.append(rr.MethodResult(method=method, main_scores=v.main_scores,
                                     average=v.average, loss=v.loss, start_loss=v.start_loss))
  curves = {}
  for k in (1, preset.gqa_kv_heads):
    points = []
    for alpha in preset.alphas:
      v = find(k, "mean", alpha)
      if v is not None:
        points.append(rr.AlphaPoint(alpha=alpha, average=v.average, loss=v.loss,
                                    start_loss=v.start_loss))
    curves[grouping.kv_label(k, n)] = points
  return headline, methods, curves


def assemble(*, preset: presets_lib.ReproducePreset, model: T5Config, pretrain: Dict,
             pretrain_origin: str, evaluations: List[Dict], timing: Dict,
             stages: Dict[str, Dict], wall_seconds: float,
             machine: Optional[str] = None, data_fingerprint: str = "",
             paper_scale: Optional[rr.PaperScaleRoofline] = None,
             conversions: Optional[List[Dict]] = None,
             paper_timing: Optional[Dict] = None) -> rr.Results:
  """The typed results from plain numbers (the pipeline and the tests both build it here).

  evaluations: [{'variant': variants.FinetuneVariant, 'scores': {task: {metric: value}},
                 'finetune': {...}, 'start_loss': pretraining-objective loss of the
                 checkpoint fine-tuning started from (optional)}].
  conversions: [{'kv_heads', 'method', 'start_loss'}]: the pretraining-objective loss of each
    converted checkpoint before any uptraining (optional).
  """
  n = model.num_heads
  timing = rr.DecodeTiming.from_json(timing)
  variants = [_variant_record(item, preset, timing, n) for item in evaluations]
  results = rr.Results(
      preset=rr.PresetRecord.from_json(preset.to_dict()),
      scale=rr.Scale(description=preset.description, num_heads=n,
                     num_layers=model.num_encoder_layers, emb_dim=model.emb_dim,
                     head_dim=model.head_dim, mlp_dim=model.mlp_dim,
                     vocab_size=model.vocab_size, params=model_params(model),
                     dtype=variants_lib.config_dict(model)["dtype"],
                     pretrain_steps=int(pretrain.get("step", preset.pretrain_steps)),
                     pretrain_origin=pretrain_origin, eval_examples=preset.eval_examples,
                     data_fingerprint=data_fingerprint),
      pretrain=pretrain,
      pretrain_throughput=pretrain_throughput(
          pretrain, model, tasks.pretrain_lengths(preset.pretrain_inputs_length)),
      paper_timing=paper_timing_rows(paper_timing, paper_scale or paper_scale_summary()),
      variants=variants, headline=[], methods=[], mha=None, alpha_curves={},
      conversions=[rr.ConversionResult(**c) for c in conversions or []], timing=timing,
      noise=noise_summary(variants, preset), paper_scale_roofline=paper_scale,
      stages={name: rr.StageTime(**stage) for name, stage in stages.items()},
      wall_seconds=wall_seconds, stage_seconds=sum(s["seconds"] for s in stages.values()),
      machine=rr.MachineRecord(description=machine or machine_description(),
                               cpu_count=os.cpu_count()))
  results.headline, results.methods, results.alpha_curves = _summaries(results, preset)
  results.mha = results.find(n)
  results.claims = claims_lib.evaluate_claims(results)
  return results


def paper_scale_summary() -> rr.PaperScaleRoofline:
  """The roofline predictions for the figures (T5.1.1-XXL on TPU v4, default setup)."""
  sim = timing_sim.simulate(perf_model.Setup())
  return rr.PaperScaleRoofline(
      groups_xxl={str(k): r["total"] for k, r in sim["groups_xxl"].items()},
      table1={name: r["total"] for name, r in sim["table1"].items()})


def collect(pipeline, wall_seconds: float) -> rr.Results:
  """The typed results of a finished `run.Pipeline` (see `assemble`), read from its stage table
  and the results of its stages."""
  p = pipeline.preset
  stage_results = pipeline.stage_results
  rows = {stage.name: stage for stage in pipeline.table}
  items = []
  for stage in pipeline.table:
    if stage.kind != "eval":
      continue
    (finetune,) = stage.needs
    (start,) = rows[finetune].needs
    items.append({"variant": stage.variant, "scores": stage_results[stage.name].result["scores"],
                  "finetune": stage_results[finetune].result,
                  "start_loss": stage_results[stage_table.probe_of(start)].result["loss"]})
  pre = stage_results["pretrain"]
  origin = (f"initialised from {pipeline.options.initial_checkpoint} (step {pre.result['step']})"
            if pipeline.options.initial_checkpoint else
            f"pretrained here for {p.pretrain_steps} steps of span corruption on the demo "
            f"corpus (batch {p.pretrain_batch}, inputs {p.pretrain_inputs_length} tokens)")
  stages = {name: {"seconds": r.seconds, "cached": r.cached} for name, r in stage_results.items()}
  conversions = [{"kv_heads": stage.kv_heads, "method": stage.method,
                  "start_loss": stage_results[stage_table.probe_of(stage.name)].result["loss"]}
                 for stage in pipeline.table if stage.kind == "convert"]
  paper_timed = stage_results.get("paper-timing")
  return assemble(preset=p, model=pipeline.model.replace(vocab_size=pipeline.vocab_size),
                  pretrain=pre.result, pretrain_origin=origin, evaluations=items,
                  timing=stage_results["timing"].result, stages=stages,
                  wall_seconds=wall_seconds, data_fingerprint=pipeline.data["fingerprint"],
                  paper_scale=paper_scale_summary(), conversions=conversions,
                  paper_timing=paper_timed.result if paper_timed is not None else None)


def write_all(results: rr.Results, out_dir, log: Callable[[str], None] = print
              ) -> List[str]:
  """results.json, table1.md, fig3-6.png and REPORT.md in `out_dir`."""
  out_dir = str(out_dir)
  os.makedirs(out_dir, exist_ok=True)
  written = []
  path = os.path.join(out_dir, RESULTS_FILE)
  text = json.dumps(results.to_json(), indent=2, sort_keys=True, allow_nan=False) + "\n"
  atomic.write_text(path, text)
  written.append(path)
  # The rest is drawn from what results.json holds, in its (sorted) order, so that `--redraw`
  # reproduces every file byte for byte: the stage table, the figures' curves and legends.
  results = rr.Results.from_json(json.loads(text))
  path = os.path.join(out_dir, "table1.md")
  atomic.write_text(path, markdown.table1_markdown(results))
  written.append(path)
  written += figures.write_figures(results, out_dir)
  path = os.path.join(out_dir, "REPORT.md")
  atomic.write_text(path, markdown.report_markdown(results))
  written.append(path)
  for path in written:
    log(f"wrote {path}")
  return written


def read_results(out_dir) -> rr.Results:
  """The typed results of DIR/results.json (one an older version wrote too)."""
  path = os.path.join(str(out_dir), RESULTS_FILE)
  try:
    with open(path) as f:
      return rr.Results.from_json(json.load(f))
  except FileNotFoundError:
    raise FileNotFoundError(f"{path} does not exist: run `gqa-t5 reproduce --out "
                            f"{out_dir}` first") from None
