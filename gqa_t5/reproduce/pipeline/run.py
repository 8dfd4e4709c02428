"""The reproduction of one preset, top to bottom: the rows of its stage table (stage_table.py)
run in this order, each cached
and resumable (see stage_cache.py), each announced as "stage i/N name (expected ~X s)" with an ETA.

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

from gqa_t5 import checkpoint_loading
from gqa_t5 import evaluation
from gqa_t5 import initial_checkpoint
from gqa_t5 import input_pipeline
from gqa_t5 import jax_setup
from gqa_t5 import partitioning
from gqa_t5 import prediction
from gqa_t5 import schedules
from gqa_t5.convert import converter
from gqa_t5.demo_data import layout
from gqa_t5.model import grouping
from gqa_t5.model.config import T5Config
from gqa_t5.reproduce.pipeline import estimate
from gqa_t5.reproduce.pipeline import presets as presets_lib
from gqa_t5.reproduce.pipeline import progress as progress_lib
from gqa_t5.reproduce.pipeline import stage_cache
from gqa_t5.reproduce.pipeline import stage_table
from gqa_t5.reproduce.pipeline import tasks
from gqa_t5.reproduce.pipeline import timing
from gqa_t5.reproduce.pipeline import training
from gqa_t5.reproduce.pipeline import variants
from gqa_t5.reproduce.report import results as results_lib

WORK_DIR = "work"


@dataclasses.dataclass
class Options:
  preset: presets_lib.ReproducePreset
  out_dir: Path
  data_dir: Optional[str] = None
  initial_checkpoint: Optional[str] = None
  progress: bool = True
  log: Callable[[str], None] = print


class Pipeline:
  """Runs the rows of one preset's stage table into `out_dir/work/stages` and collects their
  results."""

  def __init__(self, options: Options):
    self.options = options
    self.preset = options.preset
    self.out_dir = Path(options.out_dir).absolute()
    self.store = stage_cache.StageStore(self.out_dir / WORK_DIR, log=options.log)
    self.stage_results: Dict[str, stage_cache.StageResult] = {}
    self.model: T5Config = self.preset.model  # replaced by --initial-checkpoint's config
    self.machine = estimate.MACHINES[self.preset.machine]
    self.table: List[stage_table.Stage] = stage_table.stage_table(self.preset, self.num_heads)

  # ---- the whole run -------------------------------------------------------------------------

  def run(self) -> Dict[str, Any]:
    start_time = time.time()
    self._setup()
    pretrain, *rest = self.table
    self._run_stage(pretrain)
    if self.options.initial_checkpoint:
      self._adopt_initial_checkpoint()  # its model may have another head count
      rest = self.table[1:]
    for stage in rest:
      self._run_stage(stage)
    results = results_lib.collect(self, time.time() - start_time)
    results_lib.write_all(results, self.out_dir, log=self.options.log)
    return results

  def expected_seconds(self) -> List[Tuple[str, float]]:
    """(name, expected seconds) of every row of the stage table, in its order (estimate.py)."""
    return estimate.expected_seconds(self.preset, self._config(None), self.machine,
                                     tasks.pretrain_lengths(self.preset.pretrain_inputs_length))

  # ---- helpers -------------------------------------------------------------------------------

  @property
  def num_heads(self) -> int:
    return self.model.num_heads

  def _setup(self) -> None:
    self.data_dir = layout.require_complete(self.options.data_dir)
    jax_setup.enable_compilation_cache(self.out_dir / WORK_DIR / "jax_cache")
    self.vocabulary = tasks.register(str(self.data_dir))
    self.vocab_size = self.preset.vocab_size or input_pipeline.padded_vocab_size(
        self.vocabulary.vocab_size)
    marker = Path(self.data_dir) / layout.MARKER
    self.data = {"fingerprint": hashlib.sha256(marker.read_bytes()).hexdigest()[:16]}
    progress = self.store.progress = self._new_progress()
    total = estimate.format_seconds(progress.expected_left())
    finished = len(progress.finished_before)
    before = (f" ({finished} finished by an earlier run: cached unless their inputs changed)"
              if finished else "")
    self.options.log(f"{progress.total} stages{before}, expected ~{total} on "
                     f"{self.machine.name} (estimate.py); stated for this preset: "
                     f"{self.preset.time_figure}")

  def _new_progress(self) -> progress_lib.StageProgress:
    """The stage counter of the current stage table; stages a run finished before count as
    cached."""
    expected = self.expected_seconds()
    finished = [name for name, _ in expected if self.store.finished(name) is not None]
    return progress_lib.StageProgress(expected, log=self.options.log, finished_before=finished)

  def _config(self, kv_heads: Optional[int], dropout: float = 0.0) -> T5Config:
    return variants.variant_config(self.model, self.vocab_size, kv_heads, dropout)

  def _pretrain_lengths(self) -> Dict[str, int]:
    return tasks.pretrain_lengths(self.preset.pretrain_inputs_length)

  def _needed(self, stage: stage_table.Stage) -> List[stage_cache.StageResult]:
    return [self.stage_results[name] for name in stage.needs]

  def checkpoint_of(self, name: str) -> Path:
    """The checkpoint a finished stage left for the stages that read it."""
    result = self.stage_results[name]
    if name == "pretrain" and self.options.initial_checkpoint:
      return Path(result.result["checkpoint"])  # taken as is, not copied
    row = next(stage for stage in self.table if stage.name == name)
    return result.directory / row.output

  def _run_stage(self, stage: stage_table.Stage) -> stage_cache.StageResult:
    config, fn = getattr(self, "_" + stage.kind.replace("-", "_"))(stage)
    result = self.store.run(stage.name, config, fn, self._needed(stage))
    self.stage_results[stage.name] = result
    return result

  def _train(self, work: Path, *, config: T5Config, task: str, lengths, batch: int,
             total_steps: int, learning_rate, initial_checkpoint: Optional[str], seed: int = 0,
             start_step: Optional[int] = None):
    self.options.log(f"  compiling the training step for {config.emb_dim}-wide K="
                     f"{config.self_attention_kv_heads} (the first step waits for it), then "
                     f"training to step {total_steps}")
    return training.train(
        work, config=config, vocabulary=self.vocabulary, task=task, feature_lengths=lengths,
        batch_size=batch, total_steps=total_steps, learning_rate=learning_rate,
        initial_checkpoint=initial_checkpoint, seed=seed,
        checkpoint_period=self.preset.checkpoint_period, progress=self.options.progress,
        start_step=start_step)

  def _load(self, kv_heads: int, checkpoint: Path):
    """(model, partitioner, device parameters, step) of a checkpoint with K = kv_heads."""
    model = variants.make_model(self._config(kv_heads), self.vocabulary)
    partitioner = partitioning.Partitioner()
    params, step = checkpoint_loading.load_checkpoint_params(model, partitioner, str(checkpoint))
    return model, partitioner, params, step

  # Each `_<kind>` below returns the stage's (configuration, function of its work directory):
  # the configuration is what its cache key hashes, the function what runs on a miss.

  # ---- pretrain ------------------------------------------------------------------------------

  def _pretrain(self, stage: stage_table.Stage):
    if self.options.initial_checkpoint:
      return self._initial_checkpoint(os.path.abspath(self.options.initial_checkpoint))
    p = self.preset
    lengths = self._pretrain_lengths()
    config = {"model": variants.config_dict(self._config(None)), "steps": p.pretrain_steps,
              "batch": p.pretrain_batch, "lengths": lengths, "warmup": p.pretrain_warmup_steps,
              "learning_rate": p.pretrain_learning_rate, "data": self.data}

    def pretrain(work: Path):
      return self._train(
          work, config=self._config(None), task=tasks.PRETRAIN_TASK, lengths=lengths,
          batch=p.pretrain_batch, total_steps=p.pretrain_steps,
          learning_rate=schedules.rsqrt_decay(p.pretrain_learning_rate, p.pretrain_warmup_steps),
          initial_checkpoint=None, start_step=0)

    return config, pretrain

  def _initial_checkpoint(self, path: str):
    """The pretrain stage for --initial-checkpoint: a multi-head checkpoint of equal stack
    depths whose vocabulary covers the demo vocabulary, taken as is (nothing is copied); the
    run's model becomes the checkpoint's."""
    if not os.path.exists(path):
      raise ValueError(f"--initial-checkpoint {path} does not exist")
    config = {"initial_checkpoint": path, "mtime": os.stat(path).st_mtime}

    def take(work: Path):
      source = initial_checkpoint.open_for_model(path, None)
      model = source.config
      if model.num_encoder_layers != model.num_decoder_layers:
        raise ValueError(f"the reproduction needs equal encoder and decoder depths; the "
                         f"checkpoint has {model.num_encoder_layers} and "
                         f"{model.num_decoder_layers}")
      if model.self_attention_kv_heads != model.num_heads:
        raise ValueError(f"--initial-checkpoint {path} has {model.self_attention_kv_heads} "
                         f"key/value heads for {model.num_heads} query heads: the "
                         f"reproduction starts from a multi-head checkpoint")
      if model.vocab_size < int(self.vocabulary.vocab_size):
        raise ValueError(f"--initial-checkpoint {path} has vocab_size {model.vocab_size}, "
                         f"smaller than the demo vocabulary's {self.vocabulary.vocab_size}")
      return {"checkpoint": path, "step": int(source.step), "vocab_size": model.vocab_size,
              "model": variants.config_dict(model)}

    return config, take

  def _adopt_initial_checkpoint(self) -> None:
    """The run's model and vocabulary size become --initial-checkpoint's (cached or not);
    then the table and the progress counter are rebuilt for its head count."""
    result = self.stage_results["pretrain"].result
    self.model = T5Config(**{**result["model"], "dtype": self.preset.model.dtype})
    self.vocab_size = result["vocab_size"]
    self.table = stage_table.stage_table(self.preset, self.num_heads)
    old = self.store.progress
    self.store.progress = self._new_progress()
    self.store.progress.done.update(old.done)
    self.store.progress.start = old.start

  # ---- convert, uptrain, probe ---------------------------------------------------------------

  def _convert(self, stage: stage_table.Stage):
    config = {"kv_heads": stage.kv_heads, "method": stage.method, "seed": 0}
    source = self.checkpoint_of("pretrain")

    def convert(work: Path):
      spec = converter.ConversionSpec(num_kv_heads=stage.kv_heads, method=stage.method, seed=0)
      record = converter.convert(initial_checkpoint.resolve_path(str(source)),
                                 str(work / stage_table.CHECKPOINT_DIR), spec,
                                 output_format="t5x", overwrite=True)
      return {"checkpoint": stage_table.CHECKPOINT_DIR, "step": int(record["source_step"]),
              "changed_tensors": len(record["changed_tensors"])}

    return config, convert

  def _uptrain(self, stage: stage_table.Stage):
    p = self.preset
    convert, *previous = stage.needs  # previous: the smaller alpha's run this one continues
    total = int(self.stage_results["pretrain"].result["step"]) + p.uptrain_steps(stage.alpha)
    lengths = self._pretrain_lengths()
    config = {"kv_heads": stage.kv_heads, "method": stage.method, "alpha": stage.alpha,
              "total_steps": total, "batch": p.pretrain_batch, "lengths": lengths,
              "warmup": p.pretrain_warmup_steps, "learning_rate": p.pretrain_learning_rate,
              "data": self.data}

    def uptrain(work: Path):
      if previous:
        training.copy_model_dir(self.checkpoint_of(previous[0]), work)
      return self._train(
          work, config=self._config(stage.kv_heads), task=tasks.PRETRAIN_TASK, lengths=lengths,
          batch=p.pretrain_batch, total_steps=total,
          learning_rate=schedules.rsqrt_decay(p.pretrain_learning_rate, p.pretrain_warmup_steps),
          initial_checkpoint=None if previous else str(self.checkpoint_of(convert)))

    return config, uptrain

  def _probe(self, stage: stage_table.Stage):
    """The pretraining objective's validation loss of a checkpoint, before fine-tuning: what
    conversion damages and uptraining repairs, free of fine-tuning noise."""
    p = self.preset
    lengths = self._pretrain_lengths()
    config = {"batches": p.probe_batches, "batch": p.pretrain_batch, "lengths": lengths,
              "split": "validation", "data": self.data}
    (source,) = stage.needs
    checkpoint = self.checkpoint_of(source)

    def probe(work: Path):
      model, _, params, step = self._load(stage.kv_heads, checkpoint)
      dataset = input_pipeline.DatasetConfig(
          mixture_or_task_name=tasks.PRETRAIN_TASK, task_feature_lengths=dict(lengths),
          split="validation", batch_size=p.pretrain_batch, shuffle=False, seed=42, pack=True)
      return {"loss": evaluation.dataset_loss(model, params, dataset, p.probe_batches),
              "step": int(step)}

    return config, probe

  # ---- finetune and eval ---------------------------------------------------------------------

  def _finetune(self, stage: stage_table.Stage):
    p = self.preset
    variant = stage.variant
    (start,) = stage.needs
    total = int(self.stage_results[start].result["step"]) + p.finetune_steps
    lengths = {"inputs": p.inputs_length, "targets": max(p.targets_lengths.values())}
    config = {"kv_heads": variant.kv_heads, "seed": variant.seed, "total_steps": total,
              "batch": p.finetune_batch, "lengths": lengths, "learning_rate": p.finetune_lr,
              "dropout": p.finetune_dropout, "data": self.data}
    start_checkpoint = self.checkpoint_of(start)

    def finetune(work: Path):
      return self._train(
          work, config=self._config(variant.kv_heads, p.finetune_dropout),
          task=tasks.FINETUNE_MIXTURE, lengths=lengths, batch=p.finetune_batch,
          total_steps=total, learning_rate=schedules.constant(p.finetune_lr),
          initial_checkpoint=str(start_checkpoint), seed=variant.seed)

    return config, finetune

  def _eval(self, stage: stage_table.Stage):
    """Greedy decoding of `eval_examples` of each task's test split, scored with the task's
    metrics, plus the teacher-forced loss of the same examples: {'scores': {task: {metric:
    value}}}."""
    p = self.preset
    config = {"tasks": dict(p.targets_lengths), "inputs_length": p.inputs_length,
              "examples": p.eval_examples, "batch": p.eval_batch, "split": "test"}
    (tuned,) = stage.needs
    checkpoint = self.checkpoint_of(tuned)

    def evaluate(work: Path):
      self.options.log(f"  greedy decoding of {p.eval_examples} test examples x "
                       f"{len(p.targets_lengths)} tasks (compiling the decoder first)")
      model, partitioner, params, step = self._load(stage.variant.kv_heads, checkpoint)
      scores: Dict[str, Dict[str, float]] = {}
      for task, targets_length in p.targets_lengths.items():
        dataset = input_pipeline.DatasetConfig(
            mixture_or_task_name=task,
            task_feature_lengths={"inputs": p.inputs_length, "targets": targets_length},
            split="test", batch_size=p.eval_batch, shuffle=False, seed=42, pack=False)
        metrics = evaluation.inference_eval(
            model, partitioner, params, dataset, step, prediction.DecodingConfig(method="greedy"),
            num_examples=p.eval_examples, log_dir=str(work / "predictions"))
        prefix = task + "/"
        scores[task] = {name[len(prefix):]: float(value) for name, value in metrics.items()
                        if name.startswith(prefix)}
        # A far less noisy measure than decoded-text metrics on a few examples.
        scores[task]["loss"] = evaluation.dataset_loss(model, params, dataset,
                                                       -(-p.eval_examples // p.eval_batch))
      return {"scores": scores}

    return config, evaluate

  # ---- timing --------------------------------------------------------------------------------

  def timing_kv_heads(self) -> List[int]:
    """The K timed: every valid K of the run's head count (the preset's, or
    --initial-checkpoint's)."""
    return grouping.valid_kv_heads(self.num_heads)

  def _timing(self, stage: stage_table.Stage):
    p = self.preset
    kv_heads = self.timing_kv_heads()
    config = {"model": variants.config_dict(self._config(None)), "kv_heads": kv_heads,
              "batch": p.timing_batch, "input_length": p.timing_input_length,
              "output_length": p.timing_output_length, "repeats": p.timing_repeats,
              "bandwidth_gb": p.timing_bandwidth_gb}

    def measure(work: Path):
      return timing.measure(
          self._config(None), kv_heads, batch=p.timing_batch,
          input_length=p.timing_input_length, output_length=p.timing_output_length,
          repeats=p.timing_repeats, bandwidth_gb=p.timing_bandwidth_gb, log=self.options.log)

    return config, measure

  def _paper_timing(self, stage: stage_table.Stage):
    """Decode timing at the paper's shapes (random weights), for Table 1 and Fig. 6."""
    p = self.preset
    config = {"timings": [dataclasses.asdict(t) for t in p.paper_timing],
              "bandwidth_gb": p.timing_bandwidth_gb}

    def measure(work: Path):
      return timing.measure_paper_shapes(p.paper_timing, p.timing_bandwidth_gb,
                                         log=self.options.log)

    return config, measure
