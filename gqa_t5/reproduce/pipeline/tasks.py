"""The seqio tasks the reproduction trains on: the demo tasks, plus one mixture of the three
fine-tuning tasks (one fine-tuning run per model variant serves all three evaluations)."""

from __future__ import annotations

from typing import Optional

from gqa_t5.reproduce.pipeline import presets as presets_lib

PRETRAIN_TASK = "demo_span_corruption"
FINETUNE_MIXTURE = "gqa_t5_reproduce_finetune"


def register(data_dir: Optional[str] = None):
  """Registers the demo tasks over `data_dir` and the fine-tuning mixture; returns the
  vocabulary."""
  # seqio and the task modules load TensorFlow: only when a run registers its tasks.
  import seqio  # pylint: disable=g-import-not-at-top
  from gqa_t5.tasks import demo  # pylint: disable=g-import-not-at-top
  demo.register_demo_tasks(data_dir)
  seqio.MixtureRegistry.remove(FINETUNE_MIXTURE)
  seqio.MixtureRegistry.add(FINETUNE_MIXTURE, [(task, 1.0) for task in presets_lib.TASKS])
  return demo.demo_vocabulary(data_dir)


def pretrain_lengths(inputs_length: int) -> dict:
  """Span-corruption lengths: the targets length the inputs length implies."""
  from gqa_t5.tasks import span_corruption  # pylint: disable=g-import-not-at-top  # TensorFlow
  _, targets = span_corruption.span_corruption_lengths(inputs_length)
  return {"inputs": inputs_length, "targets": targets}
