"""One train step from per-host data shards, as 2 processes joined by jax.distributed or as
one process holding both shards; then (multi-process only) a short run of the train loop.

  python multihost_child.py OUT.npz --coordinator HOST:PORT --num_processes 2 --process_id I
      [--loop_dir DIR]
  python multihost_child.py OUT.npz            (one process, 2 local CPU devices)
The test compares the 2-process step with one device's step on both shards.
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("out")
  parser.add_argument("--coordinator", default=None)
  parser.add_argument("--num_processes", type=int, default=1)
  parser.add_argument("--process_id", type=int, default=0)
  parser.add_argument("--loop_dir", default=None)
  args = parser.parse_args()
  import jax
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  from gqa_t5 import partitioning
  if args.coordinator:
    assert partitioning.maybe_initialize_distributed(args.coordinator, args.num_processes,
                                                     args.process_id)
  import numpy as np
  from jax.experimental import multihost_utils
  import trainer_fixtures as fx
  from gqa_t5 import input_pipeline, optim, train as train_loop
  from gqa_t5.checkpoints import model_dir as checkpointing
  from gqa_t5 import trainer as trainer_lib

  assert jax.device_count() == 2, jax.device_count()
  fx.register_toy_task()
  cfg = fx.dataset_cfg(batch_size=8)
  shards = [next(input_pipeline.TrainBatches(cfg, i, 2)) for i in range(2)]
  if jax.process_count() == 2:
    host_batch = shards[jax.process_index()]          # this host's rows only
  else:
    host_batch = {k: np.concatenate([shards[0][k], shards[1][k]]) for k in shards[0]}
  spec = input_pipeline.model_feature_spec(cfg)
  trainer = trainer_lib.Trainer(fx.tiny_model(2, dropout_rate=0.1),
                                optim.Adafactor(learning_rate=0.01),
                                partitioning.Partitioner(2, 1), spec)
  state, metrics = trainer.train_step(trainer.init_state(), trainer.shard_batch(host_batch))
  params = multihost_utils.process_allgather(state.params, tiled=True)
  if jax.process_index() == 0:
    flat = {"/".join(str(getattr(k, "key", k)) for k in path): np.asarray(v)
            for path, v in jax.tree_util.tree_flatten_with_path(params)[0]}
    flat["__loss__"] = np.asarray(float(metrics["loss"]))
    np.savez(args.out, **flat)

  if args.loop_dir:
    # The same model and optimizer as above: the compilation cache serves both.
    state = train_loop.train(
        model=fx.tiny_model(2, dropout_rate=0.1), train_dataset_cfg=cfg,
        model_dir=args.loop_dir, total_steps=2, optimizer=optim.Adafactor(learning_rate=0.01),
        partitioner=partitioning.Partitioner(2, 1),
        checkpoint_cfg=checkpointing.CheckpointConfig(period=2), eval_period=0, log_period=1,
        progress=False)
    assert int(jax.device_get(state.step)) == 2


if __name__ == "__main__":
  main()
