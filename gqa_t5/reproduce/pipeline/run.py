"""The reproduction of one preset, top to bottom: the stages below run in this order, each cached
and resumable (see stages.py), each announced as "stage i/N name (expected ~X s)" with an ETA.

  1. pretrain   a multi-head T5.1.1-style model, span corruption on the demo corpus (or take
                --initial-checkpoint instead)
  2. convert    to MQA and GQA with several K, by mean / first / random / aligned, and probe
                each converted checkpoint on the pretraining objective
  3. uptrain    alpha x the pretraining steps, same objective and data (alpha = 0.10 continues
                the alpha = 0.05 run: same schedule, optimizer state and data order)
  4. finetune   every variant on the mixture of the demo summarisation, translation and QA
     + eval     tasks (after probing its starting checkpoint), then greedy decoding of each
                task's test split: ROUGE, BLEU, F1, and the loss
  5. timing     decode time per sample and per step for every K of the preset's model, and
                (presets with `paper_timing`) at the paper's T5.1.1-XXL / -Large shapes
  6. outputs    results.json, table1.md, fig3-6.png, REPORT.md (rewritten on every run)
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple


from gqa_t5 import input_pipeline
from gqa_t5 import jax_setup
from gqa_t5 import optim
from gqa_t5 import schedules
from gqa_t5.demo_data import layout
from gqa_t5.model import grouping
from gqa_t5.model.config import T5Config
from gqa_t5.reproduce.pipeline import estimate
from gqa_t5.reproduce.pipeline import presets as presets_lib
from gqa_t5.reproduce.pipeline import progress as progress_lib
from gqa_t5.reproduce.pipeline import stages as stages_lib
from gqa_t5.reproduce.pipeline import tasks
from gqa_t5.reproduce.pipeline import timing
from gqa_t5.reproduce.pipeline import training
from gqa_t5.reproduce.pipeline import variants
from gqa_t5.reproduce.report import results as results_lib

WORK_DIR = "work"
Start = Tuple[stages_lib.StageResult, Path]  # a checkpoint's stage and its path


@dataclasses.dataclass
class Options:
  preset: presets_lib.Preset
  out_dir: Path
  data_dir: Optional[str] = None
  initial_checkpoint: Optional[str] = None
  progress: bool = True
  log: Callable[[str], None] = print


class Pipeline:
  """Runs the stages of one preset into `out_dir/work/stages` and collects their results."""

  def __init__(self, options: Options):
    self.o = options
    self.preset = options.preset
    self.out_dir = Path(options.out_dir).absolute()
    self.store = stages_lib.StageStore(self.out_dir / WORK_DIR, log=options.log)
    self.stage_results: Dict[str, stages_lib.StageResult] = {}
    self.model: T5Config = self.preset.model  # replaced by --initial-checkpoint's config
    self.machine = estimate.MACHINES[self.preset.machine]

  # ---- the whole run -------------------------------------------------------------------------

  def run(self) -> Dict[str, Any]:
    start_time = time.time()
    self._setup()
    p = self.preset
    pre, pre_path = self.pretrain()
    self._start_progress()
    starts, conversion_probes = self.convert_and_uptrain(pre, pre_path)
    evaluations, probes = {}, {}
    for v in p.quality_variants():
      start, path = (pre, pre_path) if v.kv_heads == self.num_heads else starts[
          (v.kv_heads, v.method, v.alpha)]
      probes[v] = self.probe(start, path, v.kv_heads)
      evaluations[v] = self.finetune_and_eval(v, start, path)
    timed = self.timing()
    paper_timed = self.paper_timing()
    results = results_lib.collect(self, pre, evaluations, timed, time.time() - start_time,
                                  probes, conversion_probes, paper_timed)
    results_lib.write_all(results, self.out_dir, log=self.o.log)
    return results

  def plan(self) -> List[Tuple[str, float]]:
    """Every stage `run` asks for, in its order, with its expected seconds (estimate.py)."""
    return estimate.plan(self.preset, self._config(None), self.machine,
                         tasks.pretrain_lengths(self.preset.pretrain_inputs_length))

  # ---- helpers -------------------------------------------------------------------------------

  @property
  def num_heads(self) -> int:
    return self.model.num_heads

  def _run(self, name, config, fn, deps=()) -> stages_lib.StageResult:
    if name in self.stage_results:  # asked for again in this run (e.g. a shared checkpoint)
      return self.stage_results[name]
    result = self.store.run(name, config, fn, deps)
    self.stage_results[name] = result
    return result

  def _setup(self) -> None:
    self.data_dir = layout.require_complete(self.o.data_dir)
    jax_setup.enable_compilation_cache(self.out_dir / WORK_DIR / "jax_cache")
    self.vocabulary = tasks.register(str(self.data_dir))
    self.vocab_size = self.preset.vocab_size or input_pipeline.padded_vocab_size(
        self.vocabulary.vocab_size)
    marker = Path(self.data_dir) / layout.MARKER
    self.data = {"fingerprint": hashlib.sha256(marker.read_bytes()).hexdigest()[:16]}
    plan = self.plan()
    self.store.progress = progress_lib.Progress(plan, log=self.o.log)
    self.o.log(f"{len(plan)} stages, expected ~{estimate.format_seconds(sum(s for _, s in plan))}"
               f" on {self.machine.name} (estimate.py); stated for this preset: "
               f"{self.preset.time_figure}")

  def _start_progress(self) -> None:
    """After pretraining: --initial-checkpoint may have changed the model, so plan again."""
    if self.o.initial_checkpoint:
      old = self.store.progress
      self.store.progress = progress_lib.Progress(self.plan(), log=self.o.log)
      self.store.progress.done.update(old.done)
      self.store.progress.start = old.start

  def _config(self, kv_heads: Optional[int], dropout: float = 0.0) -> T5Config:
    return training.variant_config(self.model, self.vocab_size, kv_heads, dropout)

  def _train(self, work: Path, *, config: T5Config, task: str, lengths, batch: int,
             total_steps: int, learning_rate, initial: Optional[str], seed: int = 0,
             start_step: Optional[int] = None):
    self.o.log(f"  compiling the training step for {config.emb_dim}-wide K="
               f"{config.self_attention_kv_heads} (the first step waits for it), then "
               f"training to step {total_steps}")
    return training.train(
        work, config=config, vocabulary=self.vocabulary, task=task, feature_lengths=lengths,
        batch_size=batch, total_steps=total_steps, learning_rate=learning_rate,
        initial_checkpoint=initial, seed=seed, checkpoint_period=self.preset.checkpoint_period,
        progress=self.o.progress, start_step=start_step)

  # ---- stage 1 -------------------------------------------------------------------------------

  def pretrain(self) -> Start:
    if self.o.initial_checkpoint:
      return self._take_initial_checkpoint(os.path.abspath(self.o.initial_checkpoint))
    p = self.preset
    lengths = tasks.pretrain_lengths(p.pretrain_inputs_length)
    config = {"model": variants.config_dict(self._config(None)), "steps": p.pretrain_steps,
              "batch": p.pretrain_batch, "lengths": lengths, "warmup": p.pretrain_warmup_steps,
              "learning_rate": p.pretrain_learning_rate, "data": self.data}
    result = self._run("pretrain", config, lambda work: self._train(
        work, config=self._config(None), task=tasks.PRETRAIN_TASK, lengths=lengths,
        batch=p.pretrain_batch, total_steps=p.pretrain_steps,
        learning_rate=schedules.rsqrt_decay(p.pretrain_learning_rate, p.pretrain_warmup_steps),
        initial=None, start_step=0))
    return result, result.directory / training.MODEL_DIR

  def _take_initial_checkpoint(self, path: str) -> Start:
    if not os.path.exists(path):
      raise ValueError(f"--initial-checkpoint {path} does not exist")
    stat = os.stat(path)
    result = self._run("pretrain", {"initial_checkpoint": path, "mtime": stat.st_mtime},
                       lambda work: training.take_initial_checkpoint(path, self.vocabulary))
    model = dict(result.result["model"])
    self.model = T5Config(**{**model, "dtype": self.preset.model.dtype})
    self.vocab_size = result.result["vocab_size"]
    return result, Path(result.result["checkpoint"])

  # ---- stages 2 and 3 ------------------------------------------------------------------------

  def convert_and_uptrain(self, pre, pre_path: Path):
    """Every (K, method) the variants need: converted, probed, uptrained up to the largest
    alpha a variant uses. Returns ({(K, method, alpha): Start}, {(K, method): probe})."""
    starts: Dict[Tuple[int, str, float], Start] = {}
    probes = {}
    for k, method in self.preset.conversions():
      conv = self.convert(pre, pre_path, k, method)
      conv_path = conv.directory / conv.result["checkpoint"]
      starts[(k, method, 0.0)] = (conv, conv_path)
      probes[(k, method)] = self.probe(conv, conv_path, k)
      previous = None
      for alpha, _ in self.preset.uptrain_schedule(k, method):
        previous = self.uptrain(pre, conv, conv_path, k, method, alpha, previous)
        starts[(k, method, alpha)] = (previous, previous.directory / training.MODEL_DIR)
        self.probe(previous, starts[(k, method, alpha)][1], k)
    return starts, probes

  def convert(self, pre, pre_path: Path, k: int, method: str) -> stages_lib.StageResult:
    name = f"convert-{grouping.kv_name(k, self.num_heads)}-{method}"
    return self._run(name, {"kv_heads": k, "method": method, "seed": 0},
                     lambda work: training.convert(work, str(pre_path), k, method), deps=[pre])

  def uptrain(self, pre, start, start_path: Path, k: int, method: str, alpha: float,
              previous: Optional[stages_lib.StageResult]) -> stages_lib.StageResult:
    p = self.preset
    total = int(pre.result["step"]) + p.uptrain_steps(alpha)
    lengths = tasks.pretrain_lengths(p.pretrain_inputs_length)
    name = f"uptrain-{grouping.kv_name(k, self.num_heads)}-{method}-a{alpha:g}"
    config = {"kv_heads": k, "method": method, "alpha": alpha, "total_steps": total,
              "batch": p.pretrain_batch, "lengths": lengths, "warmup": p.pretrain_warmup_steps,
              "learning_rate": p.pretrain_learning_rate, "data": self.data}

    def fn(work: Path):
      if previous is not None:  # continue the smaller alpha's run
        training.copy_model_dir(previous.directory / training.MODEL_DIR, work)
      return self._train(
          work, config=self._config(k), task=tasks.PRETRAIN_TASK, lengths=lengths,
          batch=p.pretrain_batch, total_steps=total,
          learning_rate=schedules.rsqrt_decay(p.pretrain_learning_rate, p.pretrain_warmup_steps),
          initial=None if previous is not None else str(start_path))

    return self._run(name, config, fn, [start] + ([previous] if previous is not None else []))

  def probe(self, source: stages_lib.StageResult, path: Path,
            kv_heads: int) -> stages_lib.StageResult:
    """The pretraining objective's validation loss of a checkpoint, before fine-tuning."""
    p = self.preset
    lengths = tasks.pretrain_lengths(p.pretrain_inputs_length)
    config = {"batches": p.probe_batches, "batch": p.pretrain_batch, "lengths": lengths,
              "split": "validation", "data": self.data}
    return self._run(f"probe-{source.name}", config, lambda work: training.objective_loss(
        config=self._config(kv_heads), vocabulary=self.vocabulary, checkpoint=str(path),
        task=tasks.PRETRAIN_TASK, feature_lengths=lengths, batch_size=p.pretrain_batch,
        num_batches=p.probe_batches), deps=[source])

  # ---- stage 4 -------------------------------------------------------------------------------

  def finetune_and_eval(self, variant: presets_lib.Variant, start: stages_lib.StageResult,
                        start_path: Path) -> stages_lib.StageResult:
    p = self.preset
    key = variant.key(self.num_heads)
    total = int(start.result["step"]) + p.finetune_steps
    lengths = {"inputs": p.inputs_length, "targets": max(p.targets_lengths.values())}
    config = {"kv_heads": variant.kv_heads, "seed": variant.seed, "total_steps": total,
              "batch": p.finetune_batch, "lengths": lengths, "learning_rate": p.finetune_lr,
              "dropout": p.finetune_dropout, "data": self.data}
    tuned = self._run(f"finetune-{key}", config, lambda work: self._train(
        work, config=self._config(variant.kv_heads, p.finetune_dropout),
        task=tasks.FINETUNE_MIXTURE, lengths=lengths, batch=p.finetune_batch,
        total_steps=total, learning_rate=schedules.constant(p.finetune_lr),
        initial=str(start_path), seed=variant.seed), deps=[start])
    eval_config = {"tasks": dict(p.targets_lengths), "inputs_length": p.inputs_length,
                   "examples": p.eval_examples, "batch": p.eval_batch, "split": "test"}

    def evaluate(work: Path):
      self.o.log(f"  greedy decoding of {p.eval_examples} test examples x "
                 f"{len(p.targets_lengths)} tasks (compiling the decoder first)")
      return {"scores": training.evaluate(
          work, config=self._config(variant.kv_heads), vocabulary=self.vocabulary,
          checkpoint=str(tuned.directory / training.MODEL_DIR), tasks=p.targets_lengths,
          inputs_length=p.inputs_length, num_examples=p.eval_examples,
          batch_size=p.eval_batch)}

    return self._run(f"eval-{key}", eval_config, evaluate, deps=[tuned])

  # ---- stage 5 -------------------------------------------------------------------------------

  def timing(self) -> stages_lib.StageResult:
    p = self.preset
    ks = (p.timing_kv_heads() if self.model == p.model
          else grouping.valid_kv_heads(self.num_heads))
    config = {"model": variants.config_dict(self._config(None)), "kv_heads": ks,
              "batch": p.timing_batch, "input_length": p.timing_input_length,
              "output_length": p.timing_output_length, "repeats": p.timing_repeats,
              "bandwidth_gb": p.timing_bandwidth_gb}
    return self._run("timing", config, lambda work: timing.measure(
        self._config(None), ks, batch=p.timing_batch, input_length=p.timing_input_length,
        output_length=p.timing_output_length, repeats=p.timing_repeats,
        bandwidth_gb=p.timing_bandwidth_gb, log=self.o.log))

  def paper_timing(self) -> Optional[stages_lib.StageResult]:
    """Decode timing at the paper's shapes (random weights), for Table 1 and Fig. 6."""
    p = self.preset
    if not p.paper_timing:
      return None
    config = {"timings": [dataclasses.asdict(t) for t in p.paper_timing],
              "bandwidth_gb": p.timing_bandwidth_gb}
    return self._run("paper-timing", config, lambda work: timing.measure_paper_shapes(
        p.paper_timing, p.timing_bandwidth_gb, log=self.o.log))
