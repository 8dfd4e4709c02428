"""The scales `gqa-t5 reproduce` runs at, and the model variants each one trains.

A preset fixes the stand-in for T5.1.1 (a small multi-head model pretrained on the demo corpus),
the step counts of each stage, the conversions (key/value head counts and methods), the
uptraining proportions alpha, fine-tuning and evaluation sizes, and the decode-timing shape.
Pure Python: importing this module loads nothing heavy.
"""

from __future__ import annotations

import dataclasses
from typing import Dict, List, Optional, Tuple

METHODS = ("mean", "first", "random", "aligned")
TASKS = ("demo_summarize", "demo_translate_en_de", "demo_qa")
# The metric each task contributes to the average (the paper: ROUGE-1, BLEU, F1).
MAIN_METRIC = {"demo_summarize": "rouge1", "demo_translate_en_de": "bleu", "demo_qa": "f1"}
TASK_LABELS = {"demo_summarize": "Summarize (R1)", "demo_translate_en_de": "Translate (BLEU)",
               "demo_qa": "QA (F1)"}


@dataclasses.dataclass(frozen=True)
class ModelDims:
  emb_dim: int
  num_heads: int
  head_dim: int
  mlp_dim: int
  num_layers: int          # encoder and decoder each


@dataclasses.dataclass(frozen=True)
class Variant:
  """One fine-tuned model: K key/value heads (K = N: MHA), conversion method, alpha, seed."""
  kv_heads: int
  method: str = "mean"
  alpha: float = 0.0
  seed: int = 0

  def attention_name(self, num_heads: int) -> str:
    if self.kv_heads == num_heads:
      return "MHA"
    if self.kv_heads == 1:
      return "MQA"
    return f"GQA-{self.kv_heads}"

  def label(self, num_heads: int) -> str:
    """E.g. 'GQA-2 (alpha 0.05)', 'MQA first (alpha 0.05)', 'MHA'."""
    name = self.attention_name(num_heads)
    if self.kv_heads == num_heads:
      text = name
    else:
      method = "" if self.method == "mean" else f" {self.method}"
      text = f"{name}{method} (alpha {self.alpha:g})"
    return text + (f" seed {self.seed}" if self.seed else "")

  def key(self, num_heads: int) -> str:
    """A file-name-safe identifier, e.g. 'gqa2-mean-a0.05-s0'."""
    if self.kv_heads == num_heads:
      return f"mha-s{self.seed}"
    name = "mqa" if self.kv_heads == 1 else f"gqa{self.kv_heads}"
    return f"{name}-{self.method}-a{self.alpha:g}-s{self.seed}"


@dataclasses.dataclass(frozen=True)
class Preset:
  """Everything one scale of the reproduction needs (see PRESETS)."""
  name: str
  description: str
  model: ModelDims
  # Stage 1: pretraining (span corruption on the demo corpus).
  pretrain_steps: int
  pretrain_batch: int
  pretrain_inputs_length: int
  pretrain_warmup_steps: int       # rsqrt schedule: lr = base / sqrt(max(step, warmup))
  # Stage 2-3: conversion and uptraining.
  gqa_kv_heads: int                # the GQA of the claims (the paper's GQA-8 of 64 heads)
  extra_kv_heads: Tuple[int, ...]  # more group counts converted and uptrained at alpha 0.05
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
  # Stage 5: decode timing, at the paper's 4:1 input:output ratio and a batch large enough
  # that, as at paper scale, the key/value bytes of a step outweigh the weights'.
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

  def __post_init__(self):
    n = self.model.num_heads
    for k in (self.gqa_kv_heads,) + tuple(self.extra_kv_heads):
      if k <= 1 or k >= n or n % k:
        raise ValueError(f"preset {self.name}: GQA key/value heads {k} must divide "
                         f"num_heads={n} and lie strictly between 1 and {n}")
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
    if self.finetune_learning_rate is not None:
      return self.finetune_learning_rate
    return self.pretrain_learning_rate / max(self.pretrain_steps, self.pretrain_warmup_steps) ** 0.5

  def uptrain_steps(self, alpha: float) -> int:
    return int(round(alpha * self.pretrain_steps))

  def mha(self, seed: int = 0) -> Variant:
    return Variant(self.num_heads, "mean", 0.0, seed)

  def quality_variants(self) -> List[Variant]:
    """Every fine-tuned model, seed 0 first, then the noise repeats."""
    out = [self.mha()]
    for k in (1, self.gqa_kv_heads):
      out += [Variant(k, "mean", a) for a in self.alphas]
    out += [Variant(k, "mean", self.method_alpha) for k in self.extra_kv_heads]
    out += [Variant(1, m, self.method_alpha) for m in self.methods if m != "mean"]
    out += self.noise_variants()
    return out

  def noise_variants(self) -> List[Variant]:
    """The cheapest comparison (MQA vs GQA straight after conversion) with other seeds."""
    return [Variant(k, "mean", 0.0, s) for s in self.noise_seeds
            for k in (1, self.gqa_kv_heads)]

  def conversions(self) -> List[Tuple[int, str]]:
    """(K, method) of every converted checkpoint."""
    return sorted({(v.kv_heads, v.method) for v in self.quality_variants()
                   if v.kv_heads != self.num_heads})

  def timing_kv_heads(self) -> List[int]:
    n = self.num_heads
    return [k for k in range(1, n + 1) if n % k == 0]

  def to_dict(self) -> Dict:
    return dict(dataclasses.asdict(self), finetune_lr=self.finetune_lr)


PRESETS: Dict[str, Preset] = {}


def _register(preset: Preset) -> Preset:
  PRESETS[preset.name] = preset
  return preset


_register(Preset(
    name="quick",
    description="The README's main job: every stage on real text with a small model and few "
                "steps (budget: 15 minutes on 2 CPU cores); its quality numbers are close to "
                "noise.",
    model=ModelDims(emb_dim=128, num_heads=8, head_dim=16, mlp_dim=256, num_layers=2),
    pretrain_steps=200, pretrain_batch=16, pretrain_inputs_length=64,
    pretrain_warmup_steps=100,
    gqa_kv_heads=2, extra_kv_heads=(), alphas=(0.0, 0.05, 0.10), method_alpha=0.05,
    finetune_steps=30, finetune_batch=16, finetune_learning_rate=None, finetune_dropout=0.1,
    inputs_length=128,
    targets_lengths={"demo_summarize": 32, "demo_translate_en_de": 32, "demo_qa": 32},
    eval_examples=32, eval_batch=32, noise_seeds=(),
    timing_batch=32, timing_input_length=512, timing_output_length=128, timing_repeats=5,
    checkpoint_period=100))

_register(Preset(
    name="mini",
    description="A model and step counts large enough to compare the variants, with the "
                "run-to-run noise measured (budget: 60 minutes on 2 CPU cores).",
    model=ModelDims(emb_dim=128, num_heads=8, head_dim=16, mlp_dim=384, num_layers=2),
    pretrain_steps=1200, pretrain_batch=16, pretrain_inputs_length=96,
    pretrain_warmup_steps=200,
    gqa_kv_heads=2, extra_kv_heads=(), alphas=(0.0, 0.05, 0.10), method_alpha=0.05,
    finetune_steps=300, finetune_batch=16, finetune_learning_rate=None, finetune_dropout=0.1,
    inputs_length=128,
    targets_lengths={"demo_summarize": 32, "demo_translate_en_de": 32, "demo_qa": 32},
    eval_examples=128, eval_batch=64, noise_seeds=(1,),
    timing_batch=32, timing_input_length=512, timing_output_length=128, timing_repeats=5,
    checkpoint_period=300))

# Tests: a 2-layer model and a handful of steps on the tiny data set the test builds.
_register(Preset(
    name="test",
    description="for the tests only: seconds per stage, meaningless numbers",
    model=ModelDims(emb_dim=32, num_heads=4, head_dim=8, mlp_dim=64, num_layers=1),
    pretrain_steps=20, pretrain_batch=4, pretrain_inputs_length=32, pretrain_warmup_steps=5,
    gqa_kv_heads=2, extra_kv_heads=(), alphas=(0.0, 0.05, 0.10), method_alpha=0.05,
    finetune_steps=3, finetune_batch=4, finetune_learning_rate=0.003, finetune_dropout=0.1,
    inputs_length=32,
    targets_lengths={"demo_summarize": 8, "demo_translate_en_de": 8, "demo_qa": 8},
    eval_examples=4, eval_batch=4, noise_seeds=(1,),
    timing_batch=2, timing_input_length=16, timing_output_length=4, timing_repeats=2,
    checkpoint_period=10, timing_bandwidth_gb=0.01, probe_batches=2))


def get_preset(name: str) -> Preset:
  try:
    return PRESETS[name]
  except KeyError:
    raise ValueError(f"unknown preset {name!r}; known: {', '.join(sorted(PRESETS))} (and "
                     f"'paper' with --dry-run)") from None
