"""The file layout of a training run's MODEL_DIR: names and look-ups only, no Orbax.

  MODEL_DIR/model_config.json            the model's configuration (checked on resume)
  MODEL_DIR/config.gin                   gin's operative configuration
  MODEL_DIR/metrics.jsonl                one JSON line per logged step and split
  MODEL_DIR/<split>/                     TensorBoard summaries ('train', 'training_eval', ...)
  MODEL_DIR/inference_eval/              seqio's prediction logs
  MODEL_DIR/checkpoints/<step>/{state,data,checksums}
                                         Orbax items: the train state, the input position, a
                                         CRC-32 per state tensor (see checkpoints/model_dir.py)
  MODEL_DIR/LOCK                         the running trainer's pid and host (ModelDirLock)

Kept apart from model_dir.py (the Orbax checkpointer) so that `gqa-t5 convert` and
`gqa-t5 verify` can recognise a MODEL_DIR without importing Orbax.
"""

from __future__ import annotations

import os
from typing import List, Optional

CHECKPOINTS_DIR = "checkpoints"
STATE_ITEM = "state"
DATA_ITEM = "data"
CHECKSUMS_ITEM = "checksums"
MODEL_CONFIG_FILE = "model_config.json"
OPERATIVE_CONFIG_FILE = "config.gin"
METRICS_FILE = "metrics.jsonl"
INFERENCE_EVAL_DIR = "inference_eval"
LOCK_FILE = "LOCK"


def checkpoints_dir(model_dir: str) -> str:
  return os.path.abspath(os.path.join(model_dir, CHECKPOINTS_DIR))


def checkpoint_steps(model_dir: str) -> List[int]:
  """The steps of the complete checkpoints in MODEL_DIR (Orbax's temporary names excluded)."""
  root = checkpoints_dir(model_dir)
  if not os.path.isdir(root):
    return []
  return sorted(int(d) for d in os.listdir(root) if d.isdigit())


def latest_checkpoint_dir(model_dir: str) -> Optional[str]:
  """MODEL_DIR/checkpoints/<latest step>, or None when MODEL_DIR has no checkpoints/ folder.
  Raises FileNotFoundError when the folder exists but holds no checkpoint."""
  if not os.path.isdir(checkpoints_dir(model_dir)):
    return None
  steps = checkpoint_steps(model_dir)
  if not steps:
    raise FileNotFoundError(f"{model_dir} has a {CHECKPOINTS_DIR}/ directory but no checkpoint")
  return os.path.join(checkpoints_dir(model_dir), str(steps[-1]))


def checksums_file(checkpoint_dir: str) -> str:
  """The JSON file of the checksums item of a training checkpoint (Orbax's JsonSave writes an
  item as `<item>/metadata`)."""
  return os.path.join(checkpoint_dir, CHECKSUMS_ITEM, "metadata")


def is_training_checkpoint(path: str) -> bool:
  """A step folder MODEL_DIR/checkpoints/<step> written by our trainer."""
  return (os.path.basename(os.path.normpath(path)).isdigit()
          and os.path.isdir(os.path.join(path, STATE_ITEM))
          and os.path.isdir(os.path.join(path, DATA_ITEM)))
