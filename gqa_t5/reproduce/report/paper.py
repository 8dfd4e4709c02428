"""The paper's own numbers (Ainslie et al. 2023, Table 1), printed beside the reproduction's."""

from __future__ import annotations

from typing import Dict, Optional

from gqa_t5.model import grouping
from gqa_t5.model import sizes
from gqa_t5.model.config import T5Config

COLUMNS = ("CNN (R1)", "arXiv (R1)", "PubMed (R1)", "MediaSum (R1)", "MultiNews (R1)",
           "WMT (BLEU)", "TriviaQA (F1)")

# Each model: its T5.1.1 size (a `gqa_t5.model.sizes` name) and key/value heads (None:
# multi-head), then its time per sample per TPU v4 chip (s), average, and the columns above.
TABLE1 = {
    "MHA-Large": {"size": "large", "kv_heads": None, "time": 0.37, "average": 46.0,
                  "scores": (42.9, 44.6, 46.2, 35.5, 46.6, 27.7, 78.2)},
    "MHA-XXL": {"size": "xxl", "kv_heads": None, "time": 1.51, "average": 47.2,
                "scores": (43.8, 45.6, 47.5, 36.4, 46.9, 28.4, 81.9)},
    "MQA-XXL": {"size": "xxl", "kv_heads": 1, "time": 0.24, "average": 46.6,
                "scores": (43.0, 45.0, 46.9, 36.1, 46.5, 28.5, 81.3)},
    "GQA-8-XXL": {"size": "xxl", "kv_heads": 8, "time": 0.28, "average": 47.1,
                  "scores": (43.5, 45.4, 47.7, 36.3, 47.2, 28.4, 81.6)},
}

CLAIMS = {
    "a": "Conversion: mean pooling > first head > random initialisation, after uptraining "
         "(Fig. 4).",
    "b": "Straight after conversion (alpha = 0) GQA is far better than MQA; uptraining "
         "recovers most of the gap, with diminishing returns from alpha 0.05 to 0.10 (Fig. 5).",
    "c": "Uptrained GQA's quality is close to MHA's at a speed close to MQA's (Table 1, "
         "Fig. 3).",
    "d": "Time per sample barely grows from 1 to a few groups and rises towards MHA as the "
         "groups increase (Fig. 6).",
}


def table1_markdown() -> str:
  header = "| Model | T_infer (s) | Average | " + " | ".join(COLUMNS) + " |"
  rule = "|---" * (3 + len(COLUMNS)) + "|"
  rows = [f"| {name} | {row['time']:.2f} | {row['average']:.1f} | "
          + " | ".join(f"{s:.1f}" for s in row["scores"]) + " |"
          for name, row in TABLE1.items()]
  return "\n".join([header, rule] + rows)


def table1_seconds() -> Dict[str, float]:
  """Table 1's measured time per sample per TPU v4 chip (seconds), by model name."""
  return {name: row["time"] for name, row in TABLE1.items()}


def table1_configs() -> Dict[str, T5Config]:
  """Table 1's four models by the paper's names, sized by `gqa_t5.model.sizes`."""
  return {name: sizes.t5_1_1(row["size"], num_kv_heads=row["kv_heads"])
          for name, row in TABLE1.items()}


def xxl_seconds() -> Dict[int, float]:
  """Table 1's T5.1.1-XXL times per sample by key/value heads K (MHA: K = N), smallest K first:
  the paper's own points of Fig. 6."""
  n = sizes.t5_1_1("xxl").num_heads
  points = {row["kv_heads"] or n: row["time"] for row in TABLE1.values() if row["size"] == "xxl"}
  return dict(sorted(points.items()))


def model_name(size: str, num_kv_heads: Optional[int], num_heads: int) -> str:
  """The paper's name of a T5.1.1 model (a `gqa_t5.model.sizes` name) with K key/value heads
  (None: N), as Table 1 spells it: 'MHA-Large', 'GQA-8-XXL'."""
  suffix = {"xl": "XL", "xxl": "XXL"}.get(size, size.capitalize())
  return f"{grouping.kv_label(num_kv_heads, num_heads)}-{suffix}"
