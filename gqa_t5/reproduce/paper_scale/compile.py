"""`gqa-t5 compile`: every paper job compiled for its TPU v4 slice by TPU's own compiler.

The dry run (`dry_run.py`) checks the jobs abstractly; this compiles the real programs, on this
machine, for the chips of each job's slice (`tpu_topology.slice_devices`): the job's gin files
and bindings parsed as `python -m gqa_t5.train|eval` would parse them, its model (scanned or
unrolled, rematerialised or not), batch, lengths, micro-batches and mesh, then

  uptraining and fine-tuning:  the train step (`Trainer.lower_train_step`),
  evaluation:                  greedy decoding of a batch (`aot.lower_predict`),

and reports what each chip holds (arguments, outputs, temporaries, generated code, peak against
the chip's HBM). A job that does not fit within `tpu_topology.HEADROOM_FRACTION` of a chip is an
error naming the job, the bytes and what would make it fit. Results are cached by a digest of
the lowered program itself (with the slice and the jax and libtpu versions), so a rerun only
compiles what changed; lowering takes seconds, compiling minutes.

Full-size compiles take minutes each on a small CPU; `--jobs` picks a subset by name pattern.
"""

from __future__ import annotations

import argparse
import dataclasses
import fnmatch
import hashlib
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

import jax

from gqa_t5 import aot
from gqa_t5 import prediction
from gqa_t5 import input_pipeline
from gqa_t5 import jax_setup
from gqa_t5 import partitioning
from gqa_t5 import perf_model
from gqa_t5 import tpu_topology
from gqa_t5 import trainer as trainer_lib
from gqa_t5.checkpoints import atomic
from gqa_t5.reproduce.paper_scale import checks
from gqa_t5.reproduce.paper_scale import jobs as jobs_lib
from gqa_t5.reproduce.paper_scale import tpu_timing


@dataclasses.dataclass
class CompiledJob:
  """One job's compiled program on its slice, and the verdict."""
  name: str
  kind: str
  task: str
  slice: str
  mesh: Dict[str, int]
  settings: Dict[str, Any]
  figures: aot.ProgramFigures
  fits: bool
  verdict: str
  compile_seconds: float
  model_step_seconds: Optional[float] = None
  cached: bool = False

  def to_dict(self) -> Dict[str, Any]:
    d = dataclasses.asdict(self)
    d["figures"] = self.figures.to_dict()
    return d

  @classmethod
  def from_dict(cls, d: Dict[str, Any]) -> "CompiledJob":
    d = dict(d)
    d["figures"] = aot.ProgramFigures.from_dict(d["figures"])
    return cls(**d)


def default_cache_dir() -> str:
  return os.path.join(os.path.dirname(jax_setup.default_cache_dir()), "tpu_compile")


def _settings(job: jobs_lib.Job, kwargs: Dict[str, Any]) -> Dict[str, Any]:
  config = kwargs["model"].module.config
  cfg = kwargs.get("train_dataset_cfg") or kwargs["dataset_cfg"]
  out = {"batch": cfg.batch_size, "lengths": dict(cfg.task_feature_lengths),
         "scan_layers": config.scan_layers, "remat_policy": config.remat_policy,
         "num_kv_heads": config.self_attention_kv_heads}
  if job.entry == "gqa_t5.train":
    out["num_microbatches"] = kwargs.get("num_microbatches") or 1
  return out


def model_step_seconds(job: jobs_lib.Job, config, settings: Dict[str, Any]) -> Optional[float]:
  """The performance model's train-step time per chip (perf_model.train_step_seconds)."""
  if job.entry != "gqa_t5.train":
    return None
  lengths = settings["lengths"]
  return perf_model.train_step_seconds(
      config, batch=settings["batch"], input_length=lengths["inputs"],
      target_length=lengths["targets"], chips=job.model.slice.chips,
      remat_policy=settings["remat_policy"], num_microbatches=settings["num_microbatches"],
      model_parallel=job.model.slice.model_parallel)


def _lower(job: jobs_lib.Job, kwargs: Dict[str, Any], devices):
  """(lowered program, remedies if it does not fit)."""
  model = kwargs["model"]
  partitioner = partitioning.Partitioner(data_parallel=-1,
                                         model_parallel=job.model.slice.model_parallel,
                                         devices=devices)
  if job.entry == "gqa_t5.train":
    spec = input_pipeline.model_feature_spec(kwargs["train_dataset_cfg"])
    trainer = trainer_lib.Trainer(model, kwargs["optimizer"], partitioner, spec,
                                  kwargs.get("num_microbatches"), 0)
    return trainer.lower_train_step(), trainer_lib.memory_remedies(trainer)
  cfg = kwargs["dataset_cfg"]
  decoding = kwargs.get("decoding") or prediction.DecodingConfig()
  lengths = cfg.task_feature_lengths
  lowered = aot.lower_predict(model.with_decode_fn(decoding.decode_fn()), partitioner,
                              cfg.batch_size, int(lengths["inputs"]), int(lengths["targets"]),
                              decoding.kwargs())
  return lowered, [f"a BATCH_SIZE below {cfg.batch_size} (more evaluation batches)",
                   "a larger MODEL_PARALLEL"]


class JobCompiler:
  """Compiles jobs for their slices, reusing cached results; one device set per slice."""

  def __init__(self, cache_dir: Optional[str] = None, log: Callable[[str], None] = print):
    self.cache_dir = cache_dir
    self.log = log
    self._devices: Dict[str, List] = {}
    self._versions = (jax.__version__, tpu_topology.libtpu_version())

  def devices(self, slice_name: str) -> List:
    if slice_name not in self._devices:
      self._devices[slice_name] = tpu_topology.slice_devices(slice_name)
    return self._devices[slice_name]

  def _key(self, job: jobs_lib.Job, lowered) -> str:
    material = json.dumps([aot.program_digest(lowered), job.name, job.model.slice.name,
                           job.model.slice.model_parallel, self._versions])
    return hashlib.sha256(material.encode()).hexdigest()[:32]

  def _cached(self, key: str) -> Optional[CompiledJob]:
    if not self.cache_dir:
      return None
    path = os.path.join(self.cache_dir, key + ".json")
    if not os.path.exists(path):
      return None
    with open(path) as f:
      result = CompiledJob.from_dict(json.load(f))
    result.cached = True
    return result

  def _store(self, key: str, result: CompiledJob) -> None:
    if self.cache_dir:
      os.makedirs(self.cache_dir, exist_ok=True)
      atomic.write_text(os.path.join(self.cache_dir, key + ".json"),
                        json.dumps(result.to_dict(), indent=1))

  def compile(self, job: jobs_lib.Job) -> CompiledJob:
    kwargs = checks.parse_job(job)
    sl = job.model.slice
    t0 = time.perf_counter()
    lowered, remedies = _lower(job, kwargs, self.devices(sl.name))
    key = self._key(job, lowered)
    cached = self._cached(key)
    if cached is not None:
      return cached
    settings = _settings(job, kwargs)
    config = kwargs["model"].module.config
    figures = aot.compile_figures(lowered)
    seconds = time.perf_counter() - t0
    tpu = tpu_topology.get_slice(sl.name)
    verdict = aot.check_fits(figures, tpu.hbm_bytes, tpu_topology.HEADROOM_FRACTION,
                             what=job.name, remedies=remedies)
    result = CompiledJob(job.name, job.kind, job.task, sl.name,
                         {"data": sl.data_parallel, "model": sl.model_parallel}, settings,
                         figures, verdict.within_headroom, verdict.text, seconds,
                         model_step_seconds(job, config, settings))
    self._store(key, result)
    return result


def _candidates(job: jobs_lib.Job, config, settings: Dict[str, Any]) -> List[Dict[str, Any]]:
  """Every (rematerialisation, micro-batches) setting of a train job, fastest first by the
  performance model's step time."""
  data = job.model.slice.data_parallel
  batch = settings["batch"]
  out = []
  for remat in ("none", "minimal", "full"):
    for micro in (1, 2, 4, 8, 16, 32):
      if batch % (micro * data):
        continue
      trial = dict(settings, remat_policy=remat, num_microbatches=micro)
      out.append(dict(remat_policy=remat, num_microbatches=micro,
                      seconds=model_step_seconds(job, config, trial)))
  return sorted(out, key=lambda c: c["seconds"])


def _with_settings(job: jobs_lib.Job, remat: str, micro: int) -> jobs_lib.Job:
  bindings = dict(job.bindings, REMAT_POLICY=remat, NUM_MICROBATCHES=micro if micro > 1 else None)
  return dataclasses.replace(job, bindings=bindings, checks=[], bytes_per_chip={})


def search(job: jobs_lib.Job, compiler: "JobCompiler", log: Callable[[str], None] = print,
           max_compiles: int = 6) -> CompiledJob:
  """The fastest (by the performance model) rematerialisation and micro-batch setting of a
  train job whose compiled step fits its chips within the headroom.

  A setting that fails tells how many temporary bytes it needed; settings of the same
  rematerialisation whose temporaries, scaled by 1 / micro-batches, would not fit either are
  skipped without compiling."""
  kwargs = checks.parse_job(job)
  config = kwargs["model"].module.config
  settings = _settings(job, kwargs)
  budget = perf_model.TPU_V4.available_bytes * tpu_topology.HEADROOM_FRACTION
  needed: Dict[str, tuple] = {}  # remat -> (micro-batches, temporaries, arguments) that failed
  compiles = 0
  last = None
  for cand in _candidates(job, config, settings):
    remat, micro = cand["remat_policy"], cand["num_microbatches"]
    if remat in needed:
      failed_micro, temps, args = needed[remat]
      if args + temps * failed_micro / micro > budget:
        continue
    if compiles >= max_compiles:
      break
    trial = _with_settings(job, remat, micro)
    result = compiler.compile(trial)
    compiles += not result.cached
    log("  tried: " + line(result))
    last = result
    if result.fits:
      return result
    f = result.figures
    temps = f.temp_bytes if f.compiled else (f.needed_bytes or float("inf"))
    needed[remat] = (micro, temps, f.argument_bytes if f.compiled else 0.0)
  if last is None:
    raise ValueError(f"{job.name}: no setting left to try")
  return last


def select(jobs: List[jobs_lib.Job], patterns: Optional[str]) -> List[jobs_lib.Job]:
  """Jobs whose name matches any comma-separated, case-insensitive glob of `patterns`."""
  if not patterns:
    return jobs
  globs = [p.strip().lower() for p in patterns.split(",") if p.strip()]
  chosen = [j for j in jobs if any(fnmatch.fnmatch(j.name.lower(), g) or g in j.name.lower()
                                   for g in globs)]
  if not chosen:
    raise ValueError(f"--jobs {patterns!r} matches no job; job names look like "
                     f"{jobs[0].name!r}; all: {', '.join(j.name for j in jobs)}")
  return chosen


def _settings_text(s: Dict[str, Any]) -> str:
  parts = [f"batch {s['batch']}", f"{s['lengths']['inputs']}/{s['lengths']['targets']}",
           "scanned" if s["scan_layers"] else "unrolled", f"remat {s['remat_policy']}"]
  if "num_microbatches" in s:
    parts.append(f"{s['num_microbatches']} micro-batch" + ("es" if s["num_microbatches"] > 1
                                                           else ""))
  return ", ".join(parts)


def line(result: CompiledJob) -> str:
  f = result.figures
  state = "FITS" if result.fits else "FAIL"
  mesh = f"{result.mesh['data']}x{result.mesh['model']}"
  if f.compiled:
    memory = (f"peak {aot.gib(f.peak_bytes)} (args {aot.gib(f.argument_bytes)}, temps "
              f"{aot.gib(f.temp_bytes)})")
  else:
    memory = f"refused by the compiler: needs {aot.gib(f.needed_bytes)}"
  return (f"{state} {result.name:<32} {result.slice:<7} {mesh:<6} {_settings_text(result.settings)}"
          f" | {memory}" + (" [cached]" if result.cached else f" [{result.compile_seconds:.0f} s]"))


def markdown(results: List[CompiledJob]) -> str:
  """The table of every compiled job."""
  rows = ["| job | slice | mesh (data x model) | configuration | arguments | temporaries | "
          "code | peak per chip | of HBM | fits | model step (s) |",
          "|---|---|---|---|---|---|---|---|---|---|---|"]
  for r in results:
    f = r.figures
    peak = f.peak_bytes
    share = f"{peak / perf_model.TPU_V4.available_bytes:.0%}"
    step = "-" if r.model_step_seconds is None else f"{r.model_step_seconds:.2f}"
    if f.compiled:
      memory = (f"{aot.gib(f.argument_bytes)} | {aot.gib(f.temp_bytes)} | "
                f"{aot.gib(f.code_bytes)} | {aot.gib(peak)}")
    else:
      memory = f"- | - | - | refused: needs {aot.gib(f.needed_bytes)}"
    rows.append(f"| {r.name} | {r.slice} | {r.mesh['data']} x {r.mesh['model']} | "
                f"{_settings_text(r.settings)} | {memory} | "
                f"{share} | {'yes' if r.fits else '**no**'} | {step} |")
  return "\n".join(rows) + "\n"


def compile_all(jobs: List[jobs_lib.Job], compiler: JobCompiler,
                log: Callable[[str], None] = print, search_settings: bool = False
                ) -> List[CompiledJob]:
  results = []
  for index, job in enumerate(jobs, 1):
    log(f"[{index}/{len(jobs)}] {job.name} on {job.model.slice.name} ...")
    try:
      if search_settings and job.entry == "gqa_t5.train":
        result = search(job, compiler, log)
      else:
        result = compiler.compile(job)
    except checks.DryRunError as error:
      log(f"FAIL {job.name}: {error}")
      raise
    log(line(result))
    if not result.fits:
      log(f"     {result.verdict}")
    results.append(result)
  return results


def cached_results(cache_dir: str, earlier: Sequence[Dict[str, Any]] = ()) -> List[CompiledJob]:
  """Every result compiled into `cache_dir` so far (each setting `--search` tried, too), after
  the `earlier` ones (a report's compile_jobs.json, possibly from another machine), in job
  order, then by peak memory."""
  latest: Dict[str, CompiledJob] = {}
  records = list(earlier)
  # Oldest first, so a job and setting compiled again (its program changed) keeps the newest.
  paths = Path(cache_dir).glob("*.json") if cache_dir else ()  # '': no cache, only `earlier`
  for path in sorted(paths, key=lambda p: p.stat().st_mtime):
    with open(path) as f:
      records.append(json.load(f))
  for record in records:
    result = CompiledJob.from_dict(record)
    result.cached = True
    latest[json.dumps([result.name, result.settings], sort_keys=True)] = result
  results = list(latest.values())
  order = {job.name: i for i, job in enumerate(jobs_lib.build_jobs())}
  return sorted(results, key=lambda r: (order.get(r.name, len(order)), -r.figures.peak_bytes))


def write_report(out: str, results: List[CompiledJob]) -> None:
  os.makedirs(out, exist_ok=True)
  header = ("# The paper's jobs compiled for TPU v4 (libtpu, ahead of time)\n\n"
            "Written by `gqa-t5 compile --out DIR`: each job's own gin files and bindings, "
            "compiled by TPU's compiler for its slice's chips (one device per chip). Peak = "
            "arguments + outputs - donated + temporaries + generated code, per chip, against "
            f"the {aot.gib(perf_model.TPU_V4.available_bytes)} the compiler makes available "
            f"on a v4 chip; a job fits when it stays within "
            f"{tpu_topology.HEADROOM_FRACTION:.0%} of that. 'model step' is the performance "
            "model's estimate (perf_model.train_step_seconds), not a measurement.\n\n")
  atomic.write_text(os.path.join(out, "compile_jobs.md"), header + markdown(results))
  atomic.write_text(os.path.join(out, "compile_jobs.json"),
                    json.dumps([r.to_dict() for r in results], indent=1))


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(
      prog="gqa-t5 compile", description=__doc__,
      formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--jobs", default=None,
                      help="comma-separated name patterns, e.g. 'GQA-8-XXL uptrain' or '*XXL*' "
                           "(with --timing: model names, e.g. 'MQA-XXL,GQA-8-XXL')")
  parser.add_argument("--list", action="store_true", help="list the jobs and exit")
  parser.add_argument("--out", default=None,
                      help="write compile_jobs.md and compile_jobs.json here")
  parser.add_argument("--search", action="store_true",
                      help="for each training job, find the fastest rematerialisation and "
                           "micro-batch setting (by the performance model) that fits")
  parser.add_argument("--from-cache", action="store_true",
                      help="compile nothing: report every job and setting compiled into "
                           "--cache-dir so far (with --out, as compile_jobs.md/.json, added to "
                           "what that report already holds)")
  parser.add_argument("--timing", action="store_true",
                      help="compile the decode programs of Table 1 / Fig. 6 instead of the jobs")
  parser.add_argument("--model-axes", default=",".join(map(str, tpu_timing.MODEL_AXES)),
                      help="with --timing: model axis sizes of the 8-chip mesh (default "
                           "%(default)s)")
  parser.add_argument("--cache-dir", default=default_cache_dir(),
                      help="compiled results are kept here (default %(default)s; '' turns it "
                           "off)")
  return parser.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
  args = parse_args(argv)
  jax_setup.quiet_logs()
  jobs = jobs_lib.build_jobs()
  try:
    if args.timing:
      return _timing(args)
    if args.from_cache:
      # With --out, the report there keeps what it had; this machine's compiles supersede it.
      report = os.path.join(args.out, "compile_jobs.json") if args.out else ""
      earlier = []
      if report and os.path.exists(report):
        with open(report) as f:
          earlier = json.load(f)
      results = cached_results(args.cache_dir, earlier)
      if not results:
        raise ValueError(f"--from-cache: nothing compiled in --cache-dir {args.cache_dir!r}"
                         + (f" or in {report}" if report else "")
                         + ": run `gqa-t5 compile` (with the same --cache-dir) first")
      for result in results:
        print(line(result))
      if args.out:
        write_report(args.out, results)
      return 0
    chosen = select(jobs, args.jobs)
    if args.list:
      for job in chosen:
        print(f"{job.name}  ({job.model.slice.name})")
      return 0
    compiler = JobCompiler(args.cache_dir or None)
    results = compile_all(chosen, compiler, search_settings=args.search)
  except (ValueError, checks.DryRunError) as error:
    print(f"gqa-t5 compile: error: {error}", file=sys.stderr)
    return 2
  if args.out:
    write_report(args.out, results)
    print(f"wrote {os.path.join(args.out, 'compile_jobs.md')}")
  failed = [r for r in results if not r.fits]
  print(f"{len(results) - len(failed)} of {len(results)} jobs fit their slices"
        + (": " + "; ".join(r.verdict for r in failed) if failed else ""))
  return 2 if failed else 0


def _timing(args: argparse.Namespace) -> int:
  names = None
  if args.jobs:
    names = [n.strip() for n in args.jobs.split(",") if n.strip()]
  save = (lambda result: tpu_timing.write(args.out, result)) if args.out else None
  axes = tuple(int(a) for a in args.model_axes.split(","))
  programs = os.path.join(args.cache_dir, "programs") if args.cache_dir else None
  result = tpu_timing.run(names=names, model_axes=axes, on_row=save, cache_dir=programs)
  print(tpu_timing.table1_markdown(result))
  checks_ = tpu_timing.bytes_checks(result)
  print("\n".join(checks_))
  if args.out:
    tpu_timing.write(args.out, result)
    print(f"wrote {os.path.join(args.out, 'timing.md')}, timing.json and fig6.png")
  return 0
