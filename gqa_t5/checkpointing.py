"""Orbax checkpoints of the train state plus the input pipeline's position, in MODEL_DIR.

Layout: MODEL_DIR/checkpoints/<step>/{state, data}. Orbax writes each checkpoint under a
temporary name and renames it when complete, so a process killed mid-save leaves the previous
checkpoint as the latest loadable one. MODEL_DIR/model_config.json records the model's
configuration; a run whose configuration differs in a field that changes the parameters is
refused before any compute is spent.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Dict, Mapping, Optional, Tuple

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

from gqa_t5.train_state import TrainState

# Fields that do not change the parameter tree: a run may change them on resume.
_RUNTIME_FIELDS = ("dropout_rate", "dtype", "remat_policy", "float32_attention_logits")
MODEL_CONFIG_FILE = "model_config.json"


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
  """period: save every `period` steps (and at the end); keep: how many to keep (None: all);
  async_save: write in the background while training continues."""
  period: int = 1000
  keep: Optional[int] = None
  async_save: bool = True


def _jsonable_config(config) -> Dict[str, Any]:
  out = {}
  for field in dataclasses.fields(config):
    value = getattr(config, field.name)
    if field.name == "dtype":
      value = jnp.dtype(value).name
    elif isinstance(value, tuple):
      value = list(value)
    out[field.name] = value
  return out


def check_model_dir_config(model_dir: str, config, write: bool = True) -> None:
  """Raises ValueError if MODEL_DIR was written by a model of a different shape; records the
  configuration otherwise (atomically: temporary file, then rename)."""
  path = os.path.join(model_dir, MODEL_CONFIG_FILE)
  current = _jsonable_config(config)
  if os.path.exists(path):
    with open(path) as f:
      recorded = json.load(f)
    diffs = [f"{k}: {recorded.get(k)!r} in {path} vs {current.get(k)!r} configured"
             for k in sorted(set(recorded) | set(current))
             if k not in _RUNTIME_FIELDS and recorded.get(k) != current.get(k)]
    if diffs:
      raise ValueError(
          f"model directory {model_dir} was written by a different model configuration ("
          + "; ".join(diffs) + "). Use a new MODEL_DIR, or start from its checkpoint with "
          "INITIAL_CHECKPOINT_PATH (converting it if needed).")
  if write and jax.process_index() == 0:
    os.makedirs(model_dir, exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
      json.dump(current, f, indent=2, sort_keys=True)
    os.replace(tmp, path)


class Checkpointer:
  """Saves/restores (TrainState, data position) with orbax's CheckpointManager."""

  def __init__(self, model_dir: str, cfg: CheckpointConfig = CheckpointConfig()):
    self.directory = os.path.abspath(os.path.join(model_dir, "checkpoints"))
    self.cfg = cfg
    options = ocp.CheckpointManagerOptions(
        max_to_keep=cfg.keep, save_interval_steps=1, create=True,
        enable_async_checkpointing=cfg.async_save, cleanup_tmp_directories=True)
    self.manager = ocp.CheckpointManager(self.directory, options=options,
                                         item_names=("state", "data"))

  def latest_step(self) -> Optional[int]:
    return self.manager.latest_step()

  def all_steps(self):
    return list(self.manager.all_steps())

  def save(self, state: TrainState, data_state: Mapping[str, Any], force: bool = False) -> bool:
    step = int(jax.device_get(state.step))
    if step in self.manager.all_steps():
      return False
    return self.manager.save(
        step, args=ocp.args.Composite(state=ocp.args.StandardSave(state.to_dict()),
                                      data=ocp.args.JsonSave(dict(data_state))),
        force=force)

  def restore(self, abstract_state: TrainState, step: Optional[int] = None
              ) -> Tuple[TrainState, Dict[str, Any]]:
    """`abstract_state`: jax.ShapeDtypeStruct leaves carrying the target shardings."""
    step = self.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"no checkpoint in {self.directory}")
    restored = self.manager.restore(
        step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state.to_dict()),
                                      data=ocp.args.JsonRestore()))
    return TrainState.from_dict(restored["state"]), dict(restored["data"] or {})

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()
