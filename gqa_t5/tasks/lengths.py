"""Default feature lengths of every task, in one table.

The paper's fine-tuning lengths (Ainslie et al. 2023, Section 4.1) and T5's pretraining
lengths; the demo lengths fit a small CPU model. Gin files and the reproduce command read
these tables instead of repeating the numbers. Pure Python: importing this module pulls in
nothing heavy.
"""

from __future__ import annotations

from typing import Mapping

from gqa_t5.demo_data import layout as _demo_layout

FeatureLengths = Mapping[str, int]

# The span-corruption objective of T5: 512 input tokens, 114 target tokens (both with EOS);
# see `span_corruption.span_corruption_lengths(512)`.
PAPER_FEATURE_LENGTHS: Mapping[str, FeatureLengths] = {
    "c4_span_corruption": {"inputs": 512, "targets": 114},
    "cnn_dailymail": {"inputs": 512, "targets": 256},
    "arxiv": {"inputs": 2048, "targets": 512},
    "pubmed": {"inputs": 2048, "targets": 512},
    "multi_news": {"inputs": 2048, "targets": 512},
    "mediasum": {"inputs": 2048, "targets": 512},
    "wmt14_en_de": {"inputs": 512, "targets": 256},
    "trivia_qa": {"inputs": 2048, "targets": 32},
}

# Demo tasks (gqa_t5.demo_data): short enough for a small model on a CPU. The span-corruption
# target length is the one the 256-token input implies (noise density 0.15, mean span 3).
DEMO_FEATURE_LENGTHS: Mapping[str, FeatureLengths] = _demo_layout.DEMO_FEATURE_LENGTHS

ALL_FEATURE_LENGTHS: Mapping[str, FeatureLengths] = {
    **PAPER_FEATURE_LENGTHS, **DEMO_FEATURE_LENGTHS}


def feature_lengths(task_name: str) -> dict[str, int]:
  """Returns a copy of the default {'inputs': n, 'targets': m} of `task_name`."""
  try:
    return dict(ALL_FEATURE_LENGTHS[task_name])
  except KeyError:
    raise KeyError(
        f"No default feature lengths for task {task_name!r}; known tasks: "
        f"{sorted(ALL_FEATURE_LENGTHS)}") from None
