"""A checkpoint's parameters for a model about to run: any format the converter reads, checked
tensor by tensor against the model, placed on the devices as the partitioner shards them (what
eval, infer and the reproduction's probes and evaluations decode or score with)."""

from __future__ import annotations

from typing import Optional

from gqa_t5 import initial_checkpoint
from gqa_t5 import partitioning as partitioning_lib


def load_checkpoint_params(model, partitioner, checkpoint_path: str,
                           kv_conversion: Optional[str] = None):
  """(device parameters placed for `partitioner`, step) of a checkpoint in any format, checked
  tensor by tensor against the model (what eval and infer decode with)."""
  config = getattr(model.module, "config", None)
  if config is not None:
    partitioner.setup_for(config)
    partitioning_lib.validate(config, partitioner.mesh_shape)
  abstract, axes = partitioning_lib.abstract_params_and_axes(model)
  return initial_checkpoint.load_for_model(checkpoint_path, config, abstract,
                                           partitioner.shardings(axes), kv_conversion,
                                           setting=initial_checkpoint.EVALUATION)
