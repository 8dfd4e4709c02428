"""Run with 8 simulated CPU devices: one train step on several meshes vs one device.

Prints one JSON line per (mesh, K): the largest parameter difference from the single-device
step, and the partition spec given to the decoder's self-attention key kernel.
"""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402
import numpy as np  # noqa: E402

import trainer_fixtures as fx  # noqa: E402
from gqa_t5 import input_pipeline, optim, partitioning  # noqa: E402
from gqa_t5 import trainer as trainer_lib  # noqa: E402

CASES = [((8, 1), 2), ((2, 4), 2), ((4, 2), 2), ((1, 8), 1)]


def make_trainer(mesh_shape, k, spec, devices):
  model = fx.tiny_model(k, num_heads=8, head_dim=4, dropout_rate=0.1)
  partitioner = partitioning.Partitioner(*mesh_shape, devices=devices)
  return trainer_lib.Trainer(model, optim.Adafactor(learning_rate=0.01), partitioner, spec)


def random_state(trainer, seed=0):
  """A host train state drawn with numpy from the abstract shapes (no init to compile)."""
  rng = np.random.default_rng(seed)

  def draw(path, leaf):
    names = [str(getattr(k, "key", getattr(k, "name", k))) for k in path]
    if "params" not in names:
      return np.zeros(leaf.shape, leaf.dtype)        # optimizer statistics and the step
    if names[-1] == "scale":
      return np.ones(leaf.shape, leaf.dtype)
    return (0.2 * rng.standard_normal(leaf.shape)).astype(leaf.dtype)
  return jax.tree_util.tree_map_with_path(draw, trainer.abstract_state)


def step(trainer, host_state, host_batch):
  state = jax.device_put(host_state, trainer.state_shardings)
  state, metrics = trainer.train_step(state, trainer.shard_batch(host_batch))
  return jax.tree.map(np.asarray, jax.device_get(state.params)), float(metrics["loss"])


def spec_of(trainer, name):
  return str(trainer.params_shardings["decoder"]["layers_0"]["self_attention"][name][
      "kernel"].spec)


def main():
  assert jax.device_count() == 8, jax.device_count()
  fx.register_toy_task()
  batches = input_pipeline.TrainBatches(fx.dataset_cfg(batch_size=8))
  host_batch = next(batches)
  spec = {name: ((8,) + v.shape[1:], v.dtype) for name, v in host_batch.items()}
  reference = {}
  for k in sorted({k for _, k in CASES}):
    trainer = make_trainer((1, 1), k, spec, jax.devices()[:1])
    host_state = random_state(trainer)
    reference[k] = (host_state,) + step(trainer, host_state, host_batch)
  for mesh_shape, k in CASES:
    host_state, ref_params, ref_loss = reference[k]
    trainer = make_trainer(mesh_shape, k, spec, jax.devices())
    params, loss = step(trainer, host_state, host_batch)
    diff = max(float(np.max(np.abs(a - b)))
               for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(ref_params)))
    scale = max(float(np.max(np.abs(b))) for b in jax.tree.leaves(ref_params))
    print(json.dumps({"mesh": mesh_shape, "k": k, "max_param_diff": diff, "param_scale": scale,
                      "loss": loss, "ref_loss": ref_loss, "key_spec": spec_of(trainer, "key"),
                      "query_spec": spec_of(trainer, "query")}), flush=True)


if __name__ == "__main__":
  main()
