"""The reproduction at mini scale: six stages, each cached and resumable (see stages.py).

  1. pretrain   a multi-head T5.1.1-style model, span corruption on the demo corpus (or take
                --initial-checkpoint instead)
  2. convert    to MQA and GQA with several K, by mean / first / random / aligned
  3. uptrain    alpha x the pretraining steps, same objective and data (alpha = 0.10 continues
                the alpha = 0.05 run: same schedule, optimizer state and data order)
  4. probe      every converted and every starting checkpoint's loss on the pretraining
                objective's validation split (what conversion damages and uptraining repairs)
     finetune   on the mixture of the demo summarisation, translation and QA tasks, then
     + eval     greedy decoding of each task's test split: ROUGE, BLEU, F1, and the loss
  5. timing     decode time per sample and per step for every K
  6. outputs    results.json, table1.md, fig3-6.png, REPORT.md (rewritten on every run)
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

from gqa_t5.jax_setup import enable_compilation_cache
from gqa_t5.reproduce import presets as presets_lib
from gqa_t5.reproduce import stages as stages_lib

WORK_DIR = "work"


@dataclasses.dataclass
class Options:
  preset: presets_lib.Preset
  out_dir: Path
  data_dir: Optional[str] = None
  initial_checkpoint: Optional[str] = None
  progress: bool = True
  log: Callable[[str], None] = print


def _kv_name(k: int, n: int) -> str:
  return "mha" if k == n else ("mqa" if k == 1 else f"gqa{k}")


def _data_fingerprint(data_dir: Path) -> str:
  from gqa_t5.demo_data import layout  # pylint: disable=g-import-not-at-top
  marker = Path(data_dir) / layout.MARKER
  return hashlib.sha256(marker.read_bytes()).hexdigest()[:16]


class Pipeline:
  """Runs the stages of one preset into `out_dir/work/stages` and collects their results."""

  def __init__(self, options: Options):
    self.o = options
    self.preset = options.preset
    self.out_dir = Path(options.out_dir).absolute()
    self.store = stages_lib.StageStore(self.out_dir / WORK_DIR, log=options.log)
    self.stage_results: Dict[str, stages_lib.StageResult] = {}

  # ---- helpers -------------------------------------------------------------------------------

  def _run(self, name, config, fn, deps=()) -> stages_lib.StageResult:
    if name in self.stage_results:  # asked for again in this run (e.g. a shared checkpoint)
      return self.stage_results[name]
    result = self.store.run(name, config, fn, deps)
    self.stage_results[name] = result
    return result

  def _setup(self) -> None:
    from gqa_t5.demo_data import layout  # pylint: disable=g-import-not-at-top
    from gqa_t5.reproduce import tasks  # pylint: disable=g-import-not-at-top
    self.data_dir = layout.require_complete(self.o.data_dir)
    enable_compilation_cache(self.out_dir / WORK_DIR / "jax_cache")
    self.vocabulary = tasks.register(str(self.data_dir))
    self.vocab_size = self.preset.vocab_size or tasks.padded_vocab_size(self.vocabulary)
    self.data = {"fingerprint": _data_fingerprint(self.data_dir)}

  def _config(self, kv_heads: Optional[int], dropout: float = 0.0):
    from gqa_t5.reproduce import training  # pylint: disable=g-import-not-at-top
    return training.model_config(self.dims, self.vocab_size, kv_heads, dropout)

  # ---- stage 1 -------------------------------------------------------------------------------

  def pretrain(self) -> Tuple[stages_lib.StageResult, Path]:
    from gqa_t5 import optim  # pylint: disable=g-import-not-at-top
    from gqa_t5.reproduce import tasks, training  # pylint: disable=g-import-not-at-top
    p = self.preset
    if self.o.initial_checkpoint:
      path = os.path.abspath(self.o.initial_checkpoint)

      def take(work: Path):
        del work
        from gqa_t5.checkpoints import initial as initial_checkpoint  # pylint: disable=g-import-not-at-top
        source = initial_checkpoint.open_for_model(path, None)
        config = source.config
        if config.self_attention_kv_heads != config.num_heads:
          raise ValueError(f"--initial-checkpoint {path} has {config.self_attention_kv_heads} "
                           f"key/value heads for {config.num_heads} query heads: the "
                           f"reproduction starts from a multi-head checkpoint")
        if config.vocab_size < int(self.vocabulary.vocab_size):
          raise ValueError(f"--initial-checkpoint {path} has vocab_size {config.vocab_size}, "
                           f"smaller than the demo vocabulary's {self.vocabulary.vocab_size}")
        d = training.dims_of(config)
        return {"checkpoint": path, "step": int(source.step), "vocab_size": config.vocab_size,
                "dims": dataclasses.asdict(d)}

      if not os.path.exists(path):
        raise ValueError(f"--initial-checkpoint {path} does not exist")
      stat = os.stat(path)
      result = self._run("pretrain", {"initial_checkpoint": path, "mtime": stat.st_mtime}, take)
      self.dims = presets_lib.ModelDims(**result.result["dims"])
      self.vocab_size = result.result["vocab_size"]
      return result, Path(result.result["checkpoint"])

    self.dims = p.model
    lengths = tasks.pretrain_lengths(p.pretrain_inputs_length)
    config = {"dims": dataclasses.asdict(p.model), "vocab_size": self.vocab_size,
              "steps": p.pretrain_steps, "batch": p.pretrain_batch, "lengths": lengths,
              "warmup": p.pretrain_warmup_steps, "learning_rate": p.pretrain_learning_rate,
              "data": self.data}

    def fn(work: Path):
      return training.train(
          work, config=self._config(None), vocabulary=self.vocabulary,
          task=tasks.PRETRAIN_TASK, feature_lengths=lengths, batch_size=p.pretrain_batch,
          total_steps=p.pretrain_steps,
          learning_rate=optim.rsqrt_decay(p.pretrain_learning_rate, p.pretrain_warmup_steps),
          checkpoint_period=p.checkpoint_period, progress=self.o.progress)

    result = self._run("pretrain", config, fn)
    return result, result.directory / training.MODEL_DIR

  # ---- stages 2 and 3 ------------------------------------------------------------------------

  def convert(self, pre, pre_path: Path, k: int, method: str) -> stages_lib.StageResult:
    from gqa_t5.reproduce import training  # pylint: disable=g-import-not-at-top
    name = f"convert-{_kv_name(k, self.dims.num_heads)}-{method}"
    return self._run(name, {"kv_heads": k, "method": method, "seed": 0},
                     lambda work: training.convert(work, str(pre_path), k, method), deps=[pre])

  def uptrain(self, pre, start, start_path: Path, k: int, method: str, alpha: float,
              previous: Optional[stages_lib.StageResult]) -> stages_lib.StageResult:
    from gqa_t5 import optim  # pylint: disable=g-import-not-at-top
    from gqa_t5.reproduce import tasks, training  # pylint: disable=g-import-not-at-top
    p = self.preset
    base_step = int(pre.result["step"])
    total = base_step + p.uptrain_steps(alpha)
    lengths = tasks.pretrain_lengths(p.pretrain_inputs_length)
    name = f"uptrain-{_kv_name(k, self.dims.num_heads)}-{method}-a{alpha:g}"
    config = {"kv_heads": k, "method": method, "alpha": alpha, "total_steps": total,
              "batch": p.pretrain_batch, "lengths": lengths, "warmup": p.pretrain_warmup_steps,
              "learning_rate": p.pretrain_learning_rate, "data": self.data}

    def fn(work: Path):
      if previous is not None:  # continue the smaller alpha's run
        training.copy_model_dir(previous.directory / training.MODEL_DIR, work)
      return training.train(
          work, config=self._config(k), vocabulary=self.vocabulary, task=tasks.PRETRAIN_TASK,
          feature_lengths=lengths, batch_size=p.pretrain_batch, total_steps=total,
          learning_rate=optim.rsqrt_decay(p.pretrain_learning_rate, p.pretrain_warmup_steps),
          initial_checkpoint=None if previous is not None else str(start_path),
          checkpoint_period=p.checkpoint_period, progress=self.o.progress)

    deps = [start] + ([previous] if previous is not None else [])
    return self._run(name, config, fn, deps)

  def probe(self, source: stages_lib.StageResult, path: Path,
            kv_heads: int) -> stages_lib.StageResult:
    """The pretraining objective's validation loss of a checkpoint, before fine-tuning."""
    from gqa_t5.reproduce import tasks, training  # pylint: disable=g-import-not-at-top
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
    from gqa_t5 import optim  # pylint: disable=g-import-not-at-top
    from gqa_t5.reproduce import tasks, training  # pylint: disable=g-import-not-at-top
    p = self.preset
    key = variant.key(self.dims.num_heads)
    begin = int(start.result["step"])
    lengths = {"inputs": p.inputs_length, "targets": max(p.targets_lengths.values())}
    config = {"kv_heads": variant.kv_heads, "seed": variant.seed,
              "total_steps": begin + p.finetune_steps, "batch": p.finetune_batch,
              "lengths": lengths, "learning_rate": p.finetune_lr,
              "dropout": p.finetune_dropout, "data": self.data}

    def tune(work: Path):
      return training.train(
          work, config=self._config(variant.kv_heads, p.finetune_dropout),
          vocabulary=self.vocabulary, task=tasks.FINETUNE_MIXTURE, feature_lengths=lengths,
          batch_size=p.finetune_batch, total_steps=begin + p.finetune_steps,
          learning_rate=optim.constant(p.finetune_lr),
          initial_checkpoint=str(start_path), seed=variant.seed,
          checkpoint_period=p.checkpoint_period, progress=self.o.progress)

    tuned = self._run(f"finetune-{key}", config, tune, deps=[start])
    eval_config = {"tasks": dict(p.targets_lengths), "inputs_length": p.inputs_length,
                   "examples": p.eval_examples, "batch": p.eval_batch, "split": "test"}

    def evaluate(work: Path):
      scores = training.evaluate(
          work, config=self._config(variant.kv_heads), vocabulary=self.vocabulary,
          checkpoint=str(tuned.directory / training.MODEL_DIR), tasks=p.targets_lengths,
          inputs_length=p.inputs_length, num_examples=p.eval_examples,
          batch_size=p.eval_batch)
      return {"scores": scores}

    return self._run(f"eval-{key}", eval_config, evaluate, deps=[tuned])

  # ---- stage 5 -------------------------------------------------------------------------------

  def timing(self) -> stages_lib.StageResult:
    from gqa_t5.reproduce import timing  # pylint: disable=g-import-not-at-top
    p = self.preset
    ks = [k for k in range(1, self.dims.num_heads + 1) if self.dims.num_heads % k == 0]
    config = {"dims": dataclasses.asdict(self.dims), "vocab_size": self.vocab_size,
              "kv_heads": ks, "batch": p.timing_batch, "input_length": p.timing_input_length,
              "output_length": p.timing_output_length, "repeats": p.timing_repeats,
              "bandwidth_gb": p.timing_bandwidth_gb}
    return self._run("timing", config, lambda work: timing.measure(
        self.dims, self.vocab_size, ks, batch=p.timing_batch,
        input_length=p.timing_input_length, output_length=p.timing_output_length,
        repeats=p.timing_repeats, bandwidth_gb=p.timing_bandwidth_gb))

  # ---- all -----------------------------------------------------------------------------------

  def run(self) -> Dict[str, Any]:
    start_time = time.time()
    self._setup()
    p = self.preset
    pre, pre_path = self.pretrain()
    n = self.dims.num_heads
    variants = p.quality_variants()
    for v in variants:
      if n % v.kv_heads:
        raise ValueError(f"preset {p.name}: K={v.kv_heads} does not divide the checkpoint's "
                         f"{n} heads")
    # Stages 2-3, for every (K, method) the variants need, smallest alpha first.
    starts: Dict[Tuple[int, str, float], Tuple[stages_lib.StageResult, Path]] = {}
    conversion_probes = {}
    for k, method in p.conversions():
      conv = self.convert(pre, pre_path, k, method)
      conv_path = conv.directory / conv.result["checkpoint"]
      starts[(k, method, 0.0)] = (conv, conv_path)
      conversion_probes[(k, method)] = self.probe(conv, conv_path, k)
      needed = max(v.alpha for v in variants if (v.kv_heads, v.method) == (k, method))
      previous = None
      for alpha in p.alphas:
        if alpha == 0.0 or alpha > needed:
          continue
        previous = self.uptrain(pre, conv, conv_path, k, method, alpha, previous)
        starts[(k, method, alpha)] = (previous, previous.directory / "model")
    # Stage 4, after scoring every starting checkpoint on the pretraining objective.
    evaluations, probes = {}, {}
    for v in variants:
      if v.kv_heads == n:
        start, path = pre, pre_path
      else:
        start, path = starts[(v.kv_heads, v.method, v.alpha)]
      probes[v] = self.probe(start, path, v.kv_heads)
      evaluations[v] = self.finetune_and_eval(v, start, path)
    # Stage 5.
    timed = self.timing()
    # Stage 6.
    from gqa_t5.reproduce import outputs  # pylint: disable=g-import-not-at-top
    results = outputs.collect(self, pre, evaluations, timed, time.time() - start_time, probes,
                              conversion_probes)
    outputs.write_all(results, self.out_dir, log=self.o.log)
    return results
