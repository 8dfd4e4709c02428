"""The one stage table of a preset: every stage the reproduction runs, in its order, as data.

Both readers take it from `stage_table`: the runner (`run.Pipeline`) runs each row with the
function its `kind` names, and the time estimate (`estimate.expected_seconds`) prices each row
with the cost function its `kind` names. Neither keeps a list of its own, so the "stage i/N"
counter counts exactly the stages that run.

  pretrain      a multi-head model on span corruption (or --initial-checkpoint's, taken as is)
  convert       the pretrained checkpoint to K key/value heads by one method
  uptrain       the converted checkpoint, alpha x the pretraining steps (continuing the smaller
                alpha's run of the same conversion)
  probe         a checkpoint's pretraining-objective loss before fine-tuning
  finetune      one variant on the fine-tuning mixture
  eval          greedy decoding of the fine-tuned variant on every task's test split
  timing        decode time of every K of the run's model
  paper-timing  decode time at the paper's T5.1.1 shapes (presets with `paper_timing`)
"""

from __future__ import annotations

import dataclasses
from typing import List, Optional, Tuple

from gqa_t5.model import grouping
from gqa_t5.reproduce.pipeline import presets as presets_lib
from gqa_t5.reproduce.pipeline import variants

# What a stage leaves in its directory for the stages that read it.
MODEL_DIR = "model"            # a training run's MODEL_DIR (pretrain, uptrain, finetune)
CHECKPOINT_DIR = "checkpoint"  # a converted checkpoint (convert)

KINDS = ("pretrain", "convert", "uptrain", "probe", "finetune", "eval", "timing",
         "paper-timing")


@dataclasses.dataclass(frozen=True)
class Stage:
  """One row of the table.

  needs: the stages whose results or checkpoints it reads, by name (its cache key includes
    theirs, so redoing one redoes this one).
  output: the checkpoint it leaves inside its directory for later stages (None: numbers only).
  kv_heads, method, alpha: the conversion a convert / uptrain / probe stage works on.
  variant: the fine-tuned model of a finetune / eval stage.
  steps: the training steps the stage itself runs (pretrain, uptrain, finetune).
  """
  name: str
  kind: str
  needs: Tuple[str, ...] = ()
  output: Optional[str] = None
  kv_heads: Optional[int] = None
  method: str = "mean"
  alpha: float = 0.0
  variant: Optional[variants.FinetuneVariant] = None
  steps: int = 0

  def __post_init__(self):
    if self.kind not in KINDS:
      raise ValueError(f"stage {self.name}: unknown kind {self.kind!r}; known: {KINDS}")


def conversion_name(kv_heads: int, method: str, num_heads: int) -> str:
  return f"{grouping.kv_name(kv_heads, num_heads)}-{method}"


def uptrain_name(kv_heads: int, method: str, alpha: float, num_heads: int) -> str:
  return f"uptrain-{conversion_name(kv_heads, method, num_heads)}-a{alpha:g}"


def probe_of(stage_name: str) -> str:
  """The name of the probe stage that scores `stage_name`'s checkpoint."""
  return f"probe-{stage_name}"


def stage_table(preset: presets_lib.ReproducePreset, num_heads: int) -> List[Stage]:
  """Every stage of `preset` for a model of `num_heads` query heads, in the order they run.

  num_heads: the preset's, or --initial-checkpoint's when that changes the model (stage names
  and the conversions' K depend on it).
  """
  table = [Stage("pretrain", "pretrain", output=MODEL_DIR, steps=preset.pretrain_steps)]
  # Where each fine-tuned variant starts: {(K, method, alpha): the stage holding it}.
  starts = {}
  for k, method in preset.conversions():
    convert = f"convert-{conversion_name(k, method, num_heads)}"
    table.append(Stage(convert, "convert", needs=("pretrain",), output=CHECKPOINT_DIR,
                       kv_heads=k, method=method))
    table.append(Stage(probe_of(convert), "probe", needs=(convert,), kv_heads=k))
    starts[(k, method, 0.0)] = convert
    previous = convert
    for alpha, steps in preset.uptrain_schedule(k, method):
      uptrain = uptrain_name(k, method, alpha, num_heads)
      # The first alpha starts from the conversion; each later one continues the one before.
      needs = (convert,) if previous == convert else (convert, previous)
      table.append(Stage(uptrain, "uptrain", needs=needs, output=MODEL_DIR, kv_heads=k,
                         method=method, alpha=alpha, steps=steps))
      table.append(Stage(probe_of(uptrain), "probe", needs=(uptrain,), kv_heads=k))
      starts[(k, method, alpha)] = uptrain
      previous = uptrain
  for variant in preset.quality_variants():
    if variant.kv_heads == num_heads:
      start = "pretrain"
      if not any(stage.name == probe_of("pretrain") for stage in table):
        table.append(Stage(probe_of("pretrain"), "probe", needs=("pretrain",),
                           kv_heads=num_heads))
    else:
      start = starts[(variant.kv_heads, variant.method, variant.alpha)]
    key = variant.key(num_heads)
    table.append(Stage(f"finetune-{key}", "finetune", needs=(start,), output=MODEL_DIR,
                       variant=variant, steps=preset.finetune_steps))
    table.append(Stage(f"eval-{key}", "eval", needs=(f"finetune-{key}",), variant=variant))
  table.append(Stage("timing", "timing"))
  if preset.paper_timing:
    table.append(Stage("paper-timing", "paper-timing"))
  return table

