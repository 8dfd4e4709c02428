"""The scales `gqa-t5 reproduce` runs at, and the model variants each one trains.

A preset fixes the stand-in for T5.1.1 (a `T5Config`: a small multi-head model pretrained on the
demo corpus), the step counts of each stage, the conversions (key/value head counts and methods),
the uptraining proportions alpha, fine-tuning and evaluation sizes, the decode-timing shapes, and
the one time figure the docs and `--help` state for it. `smoke` shrinks any preset to seconds
per stage (CI runs the `gpu` preset that way on CPU).

The `gpu` preset's size and its expected time (computed, not yet measured) are worked out in the
comment above its definition; `estimate.py` computes the same terms, printed at a run's start.
"""

from __future__ import annotations

import dataclasses
from typing import Dict, List, Optional, Tuple

from gqa_t5.model import grouping
from gqa_t5.model.config import T5Config
from gqa_t5.reproduce.pipeline.variants import PaperTiming
from gqa_t5.reproduce.pipeline.variants import FinetuneVariant
from gqa_t5.reproduce.pipeline.variants import config_dict
from gqa_t5.reproduce.pipeline.variants import small_model

METHODS = ("mean", "first", "random", "aligned")
TASKS = ("demo_summarize", "demo_translate_en_de", "demo_qa")
# The metric each task contributes to the average (the paper: ROUGE-1, BLEU, F1), in %.
MAIN_METRIC = {"demo_summarize": "rouge1", "demo_translate_en_de": "bleu", "demo_qa": "f1"}
TASK_LABELS = {"demo_summarize": "Summarize (R1)", "demo_translate_en_de": "Translate (BLEU)",
               "demo_qa": "QA (F1)"}


def finetune_rate(finetune_learning_rate: Optional[float], pretrain_learning_rate: float,
                  pretrain_steps: int, pretrain_warmup_steps: int) -> float:
  """The constant fine-tuning rate: the given one, else the rsqrt pretraining schedule's final
  rate, base / sqrt(max(steps, warmup)) (the paper's 0.001 is T5's after its 1M steps)."""
  if finetune_learning_rate is not None:
    return finetune_learning_rate
  return pretrain_learning_rate / max(pretrain_steps, pretrain_warmup_steps) ** 0.5


@dataclasses.dataclass(frozen=True)
class ReproducePreset:
  """Everything one scale of the reproduction needs (see PRESETS)."""
  name: str
  description: str
  time_figure: str                 # the one stated run time, with the machine it is from
  model: T5Config                  # variants.small_model
  # Stage 1: pretraining (span corruption on the demo corpus).
  pretrain_steps: int
  pretrain_batch: int
  pretrain_inputs_length: int
  pretrain_warmup_steps: int       # rsqrt schedule: lr = base / sqrt(max(step, warmup))
  # Stage 2-3: conversion and uptraining.
  gqa_kv_heads: int                # the GQA of the claims (the paper's GQA-8 of 64 heads)
  extra_kv_heads: Tuple[int, ...]  # more group counts converted and uptrained at method_alpha
  alphas: Tuple[float, ...]
  method_alpha: float              # the alpha of the conversion-method comparison (Fig. 4)
  # Stage 4: fine-tuning on the mixture of TASKS, then greedy evaluation.
  finetune_steps: int
  finetune_batch: int
  # Constant; None: the pretraining schedule's final rate, as in the paper (T5's rsqrt schedule
  # ends its 1M steps at 0.001, the paper's fine-tuning rate).
  finetune_learning_rate: Optional[float]
  finetune_dropout: float
  inputs_length: int
  targets_lengths: Dict[str, int]
  eval_examples: int
  eval_batch: int
  noise_seeds: Tuple[int, ...]     # extra fine-tuning seeds of the cheapest comparison
  # Stage 5: decode timing of the preset's own model, at the paper's 4:1 input:output ratio
  # and a batch large enough that the key/value bytes of a step outweigh the weights'.
  timing_batch: int
  timing_input_length: int
  timing_output_length: int
  timing_repeats: int
  checkpoint_period: int = 200
  vocab_size: Optional[int] = None  # None: the vocabulary's size rounded up to 128
  methods: Tuple[str, ...] = METHODS  # conversion methods compared at method_alpha (Fig. 4)
  timing_bandwidth_gb: float = 0.25  # size of the array the memory-bandwidth probe sums
  # T5's rsqrt schedule has base 1.0 and 10k warmup steps (0.01 at first); with a short warmup
  # the base sets the step size: 0.3 trained better than 1.0 at these scales (loss 4.94 vs
  # 5.43 after 300 steps of `quick`'s model).
  pretrain_learning_rate: float = 0.3
  # Batches of the pretraining task's validation split on which every checkpoint (pretrained,
  # converted, uptrained) is scored before fine-tuning.
  probe_batches: int = 8
  # Stage 5b: decode timing at the paper's shapes (None: not run; needs an accelerator).
  paper_timing: Tuple[PaperTiming, ...] = ()
  machine: str = "cpu"             # the `estimate.MACHINES` profile its expected times use
  hidden: bool = False             # not offered by --help (the tests' preset)

  def __post_init__(self):
    n = self.model.num_heads
    for k in (self.gqa_kv_heads,) + tuple(self.extra_kv_heads):
      if k in (1, n) or k not in grouping.valid_kv_heads(n):
        raise ValueError(f"preset {self.name}: GQA key/value heads {k} must divide "
                         f"num_heads={n} and lie strictly between 1 and {n}")
    if self.model.num_encoder_layers != self.model.num_decoder_layers:
      raise ValueError(f"preset {self.name}: encoder and decoder depths must be equal, got "
                       f"{self.model.num_encoder_layers} and {self.model.num_decoder_layers}")
    if self.method_alpha not in self.alphas:
      raise ValueError(f"preset {self.name}: method_alpha {self.method_alpha} is not one of "
                       f"alphas {self.alphas}")
    if sorted(self.alphas) != list(self.alphas) or self.alphas[0] != 0.0:
      raise ValueError(f"preset {self.name}: alphas must be increasing from 0, got "
                       f"{self.alphas}")
    unknown = [m for m in self.methods if m not in METHODS]
    if unknown or "mean" not in self.methods:
      raise ValueError(f"preset {self.name}: methods {self.methods} must include 'mean' and "
                       f"come from {METHODS}")
    for name in ("pretrain_steps", "finetune_steps", "eval_examples", "timing_repeats"):
      if getattr(self, name) <= 0:
        raise ValueError(f"preset {self.name}: {name} must be positive")

  # ---- the variants ---------------------------------------------------------------------------

  @property
  def num_heads(self) -> int:
    return self.model.num_heads

  @property
  def finetune_lr(self) -> float:
    return finetune_rate(self.finetune_learning_rate, self.pretrain_learning_rate,
                         self.pretrain_steps, self.pretrain_warmup_steps)

  def uptrain_steps(self, alpha: float) -> int:
    return int(round(alpha * self.pretrain_steps))

  def uptrain_schedule(self, k: int, method: str) -> List[Tuple[float, int]]:
    """(alpha, steps of that stage) of each uptraining of (K, method), smallest alpha first:
    up to the largest alpha a variant of (K, method) uses, each continuing the one before."""
    needed = max(v.alpha for v in self.quality_variants() if (v.kv_heads, v.method) == (k, method))
    alphas = [a for a in self.alphas if 0.0 < a <= needed]
    steps = [self.uptrain_steps(a) for a in alphas]
    return list(zip(alphas, [s - prev for s, prev in zip(steps, [0] + steps)]))

  def mha(self, seed: int = 0) -> FinetuneVariant:
    return FinetuneVariant(self.num_heads, "mean", 0.0, seed)

  def quality_variants(self) -> List[FinetuneVariant]:
    """Every fine-tuned model, seed 0 first, then the noise repeats."""
    out = [self.mha()]
    for k in (1, self.gqa_kv_heads):
      out += [FinetuneVariant(k, "mean", a) for a in self.alphas]
    out += [FinetuneVariant(k, "mean", self.method_alpha) for k in self.extra_kv_heads]
    out += [FinetuneVariant(1, m, self.method_alpha) for m in self.methods if m != "mean"]
    out += self.noise_variants()
    return out

  def noise_variants(self) -> List[FinetuneVariant]:
    """The cheapest comparison (MQA vs GQA straight after conversion) with other seeds."""
    return [FinetuneVariant(k, "mean", 0.0, s) for s in self.noise_seeds
            for k in (1, self.gqa_kv_heads)]

  def conversions(self) -> List[Tuple[int, str]]:
    """(K, method) of every converted checkpoint."""
    return sorted({(v.kv_heads, v.method) for v in self.quality_variants()
                   if v.kv_heads != self.num_heads})

  def timing_kv_heads(self) -> List[int]:
    return grouping.valid_kv_heads(self.num_heads)

  def to_dict(self) -> Dict:
    out = dataclasses.asdict(self)
    out["model"] = config_dict(self.model)
    out["paper_timing"] = [dataclasses.asdict(t) for t in self.paper_timing]
    out["finetune_lr"] = self.finetune_lr
    return out


def smoke(preset: ReproducePreset) -> ReproducePreset:
  """The same preset's stages at seconds per stage: every kind of stage and every code path
  (alpha continuation, a non-mean conversion, noise seeds, both timings) with the same head
  structure, on a 1+1-layer model of width 32, a handful of steps and examples, tiny timing
  shapes; repeats of one path are dropped (the third conversion method; paper-shape K other
  than 1, 8 and N)."""
  n = preset.num_heads
  paper = tuple(dataclasses.replace(
      t, shrink=True, batch=2, input_length=16, output_length=4, repeats=1, dtype="float32",
      kv_heads=tuple(k for k in t.kv_heads if k in (1, 8, max(t.kv_heads))))
                for t in preset.paper_timing)
  return dataclasses.replace(
      preset, name=f"{preset.name}-smoke",
      description=f"{preset.name} at smoke-test size (seconds per stage, meaningless numbers)",
      time_figure="a minute or two on a CPU (smoke test)",
      model=small_model(emb_dim=32, num_heads=n, head_dim=4, mlp_dim=64, layers=1),
      pretrain_steps=20, pretrain_batch=4, pretrain_inputs_length=32, pretrain_warmup_steps=5,
      finetune_steps=2, finetune_batch=4, finetune_learning_rate=0.003, inputs_length=32,
      targets_lengths={t: 8 for t in TASKS}, eval_examples=2, eval_batch=2, timing_batch=2,
      timing_input_length=16, timing_output_length=4, timing_repeats=1, checkpoint_period=10,
      timing_bandwidth_gb=0.01, probe_batches=1, paper_timing=paper, machine="cpu",
      methods=preset.methods[:2])


PRESETS: Dict[str, ReproducePreset] = {}


def _register(preset: ReproducePreset) -> ReproducePreset:
  PRESETS[preset.name] = preset
  return preset


_register(ReproducePreset(
    name="quick",
    description="The README's main job: every stage on real text with a small model and few "
                "steps; its quality numbers are close to noise.",
    time_figure=("5.6-12.9 min + 36-51 s demo-data preparation on a quiet 2-core x86-64 CPU "
                 "with a fresh compilation cache (5.6 min on two cores, 12.9 on two hardware "
                 "threads of one core)"),
    model=small_model(emb_dim=128, num_heads=8, head_dim=16, mlp_dim=256, layers=2),
    pretrain_steps=200, pretrain_batch=16, pretrain_inputs_length=64,
    pretrain_warmup_steps=100,
    gqa_kv_heads=2, extra_kv_heads=(), alphas=(0.0, 0.05, 0.10), method_alpha=0.05,
    finetune_steps=30, finetune_batch=16, finetune_learning_rate=None, finetune_dropout=0.1,
    inputs_length=128,
    targets_lengths={"demo_summarize": 32, "demo_translate_en_de": 32, "demo_qa": 32},
    eval_examples=32, eval_batch=32, noise_seeds=(),
    timing_batch=32, timing_input_length=512, timing_output_length=128, timing_repeats=5,
    checkpoint_period=100))

_register(ReproducePreset(
    name="mini",
    description="A model and step counts large enough to compare the variants, with the "
                "run-to-run noise measured.",
    time_figure=("25-35 min + 36-51 s demo-data preparation on a quiet 2-core x86-64 CPU (25.2, "
                 "30.8 and 34.6 min on two cores, 33 on two hardware threads of one core)"),
    model=small_model(emb_dim=128, num_heads=8, head_dim=16, mlp_dim=384, layers=2),
    pretrain_steps=1200, pretrain_batch=16, pretrain_inputs_length=96,
    pretrain_warmup_steps=200,
    gqa_kv_heads=2, extra_kv_heads=(), alphas=(0.0, 0.05, 0.10), method_alpha=0.05,
    finetune_steps=300, finetune_batch=16, finetune_learning_rate=None, finetune_dropout=0.1,
    inputs_length=128,
    targets_lengths={"demo_summarize": 32, "demo_translate_en_de": 32, "demo_qa": 32},
    eval_examples=128, eval_batch=64, noise_seeds=(1,),
    timing_batch=32, timing_input_length=512, timing_output_length=128, timing_repeats=5,
    checkpoint_period=300))

# One H200: T5.1.1-Small's width (d_model 512, MLP 1024, 8+8 layers) with 8 heads of 64 (not 6)
# so that GQA-2 and GQA-4 have real groups, 58.7M parameters (54.5M that multiply), bfloat16.
# At 30% MFU of 989 TFLOP/s: pretraining 1,600 steps of 6.78 TFLOP (perf_model.train_step_flops
# of 128 x (256 + 58) tokens) = 40 s; uptraining 29 s; fine-tuning 11 x 200 steps 59 s;
# evaluation 73 s; probes and conversions 42 s; timing 26 s; the paper-shape timing (XXL x 6 K
# + Large) 123 s; 46 stages, 390 s = 6.5 min in all, a computed estimate (estimate.py has the
# assumptions; docs/REPRODUCE.md the table).
_register(ReproducePreset(
    name="gpu",
    description="One H200: a T5.1.1-Small-like model (59M parameters, 8 heads) trained long "
                "enough that decoded scores rank the variants, and decode timing at the "
                "paper's T5.1.1-XXL and -Large shapes.",
    time_figure="about 6.5 min on one H200, a computed estimate (not yet measured)",
    model=small_model(emb_dim=512, num_heads=8, head_dim=64, mlp_dim=1024, layers=8,
                      dtype="bfloat16"),
    pretrain_steps=1600, pretrain_batch=128, pretrain_inputs_length=256,
    pretrain_warmup_steps=300,
    gqa_kv_heads=2, extra_kv_heads=(), alphas=(0.0, 0.05, 0.10), method_alpha=0.05,
    finetune_steps=200, finetune_batch=64, finetune_learning_rate=None, finetune_dropout=0.1,
    inputs_length=256,
    targets_lengths={"demo_summarize": 32, "demo_translate_en_de": 64, "demo_qa": 32},
    eval_examples=256, eval_batch=256, noise_seeds=(1,),
    timing_batch=64, timing_input_length=512, timing_output_length=128, timing_repeats=2,
    checkpoint_period=800, timing_bandwidth_gb=2.0, probe_batches=4,
    methods=("mean", "first", "random"),
    paper_timing=(PaperTiming("xxl", kv_heads=(1, 4, 8, 16, 32, 64), batch=16, repeats=1),
                  PaperTiming("large", kv_heads=(16,), batch=16, repeats=1)),
    machine="h200"))

# Tests: a 1-layer model and a handful of steps on the tiny data set the tests build.
_register(ReproducePreset(
    name="test",
    description="for the tests only: seconds per stage, meaningless numbers",
    time_figure="seconds per stage (tests only)",
    model=small_model(emb_dim=32, num_heads=4, head_dim=8, mlp_dim=64, layers=1),
    pretrain_steps=20, pretrain_batch=4, pretrain_inputs_length=32, pretrain_warmup_steps=5,
    gqa_kv_heads=2, extra_kv_heads=(), alphas=(0.0, 0.05, 0.10), method_alpha=0.05,
    finetune_steps=3, finetune_batch=4, finetune_learning_rate=0.003, finetune_dropout=0.1,
    inputs_length=32,
    targets_lengths={"demo_summarize": 8, "demo_translate_en_de": 8, "demo_qa": 8},
    eval_examples=4, eval_batch=4, noise_seeds=(1,),
    timing_batch=2, timing_input_length=16, timing_output_length=4, timing_repeats=2,
    checkpoint_period=10, timing_bandwidth_gb=0.01, probe_batches=2, hidden=True))


def public_names() -> List[str]:
  """The presets --help offers (the tests' preset is hidden)."""
  return [name for name, p in PRESETS.items() if not p.hidden]


def get_preset(name: str, smoke_test: bool = False) -> ReproducePreset:
  try:
    preset = PRESETS[name]
  except KeyError:
    raise ValueError(f"unknown preset {name!r}; known: {', '.join(public_names())} (and "
                     f"'paper' with --dry-run)") from None
  return smoke(preset) if smoke_test else preset
