"""A training run in its own process, for the resume, kill and multi-process tests.

  python trainer_child.py MODEL_DIR TOTAL_STEPS [--kill_after_save STEP] [--kill_in_save STEP]
      [--out FILE.npz] [--coordinator HOST:PORT --num_processes N --process_id I]

--kill_after_save: SIGKILL this process as soon as the checkpoint of STEP is complete.
--kill_in_save: SIGKILL it while the checkpoint of STEP is being written (before orbax
  commits it).
--signal_in_save STEP:NAME: keep the checkpoint of STEP in flight a second longer, and send
  this process signal NAME (TERM or INT) as the next step starts: the run must finish that save,
  save step STEP + 1 and exit with status 128 + signal.
--out: write the final parameters (flattened '/'-joined names) to an npz file.
"""

import argparse
import os
import signal
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("model_dir")
  parser.add_argument("total_steps", type=int)
  parser.add_argument("--kill_after_save", type=int, default=None)
  parser.add_argument("--kill_in_save", type=int, default=None)
  parser.add_argument("--signal_in_save", default=None)
  parser.add_argument("--out", default=None)
  parser.add_argument("--coordinator", default=None)
  parser.add_argument("--num_processes", type=int, default=None)
  parser.add_argument("--process_id", type=int, default=None)
  parser.add_argument("--batch_size", type=int, default=8)
  parser.add_argument("--num_kv_heads", type=int, default=2)
  args = parser.parse_args()

  import jax
  if args.coordinator:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    from gqa_t5 import partitioning
    partitioning.maybe_initialize_distributed(args.coordinator, args.num_processes,
                                              args.process_id)
  import numpy as np
  import trainer_fixtures as fx
  from gqa_t5 import optim, schedules, train as train_loop
  from gqa_t5.checkpoints import model_dir as checkpointing

  if args.kill_in_save is not None:
    # Die at the moment orbax would commit the step's checkpoint: everything is written to
    # the temporary directory, nothing renamed yet.
    from orbax.checkpoint._src.path import atomicity  # pylint: disable=g-import-not-at-top
    original_finalize = atomicity.AtomicRenameTemporaryPath.finalize

    async def finalize_or_die(self, *a, **k):
      if os.path.basename(str(self._final_path)) == str(args.kill_in_save):  # pylint: disable=protected-access
        os.kill(os.getpid(), signal.SIGKILL)
      return await original_finalize(self, *a, **k)
    atomicity.AtomicRenameTemporaryPath.finalize = finalize_or_die

  if args.signal_in_save is not None:
    import asyncio
    from orbax.checkpoint._src.path import atomicity  # pylint: disable=g-import-not-at-top
    signal_step, name = args.signal_in_save.split(":")
    signum = getattr(signal, "SIG" + name)
    # A backgrounded shell starts children with SIGINT ignored: give it its ordinary handler.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    original_finalize_s = atomicity.AtomicRenameTemporaryPath.finalize

    async def slow_finalize(self, *a, **k):
      if os.path.basename(str(self._final_path)) == signal_step:  # pylint: disable=protected-access
        await asyncio.sleep(1.0)  # the save stays in flight while the main thread goes on
      return await original_finalize_s(self, *a, **k)
    atomicity.AtomicRenameTemporaryPath.finalize = slow_finalize

    from gqa_t5 import trainer as trainer_lib  # pylint: disable=g-import-not-at-top
    original_step = trainer_lib.Trainer.train_step

    def signal_then_step(self, state, batch):
      if int(jax.device_get(state.step)) == int(signal_step):
        os.kill(os.getpid(), signum)  # the save of signal_step was just started, asynchronously
      return original_step(self, state, batch)
    trainer_lib.Trainer.train_step = signal_then_step

  if args.kill_after_save is not None:
    original_save2 = checkpointing.Checkpointer.save

    def save_and_die(self, state, data_state, force=False):
      result = original_save2(self, state, data_state, force)
      if int(jax.device_get(state.step)) == args.kill_after_save:
        self.manager.wait_until_finished()
        os.kill(os.getpid(), signal.SIGKILL)
      return result
    checkpointing.Checkpointer.save = save_and_die

  fx.register_toy_task()
  try:
    state = _train(args, fx, optim, schedules, train_loop, checkpointing)
  except checkpointing.Preempted as stopped:
    print(f"trainer_child: {stopped}", file=sys.stderr)
    sys.exit(stopped.exit_code)
  if args.out and jax.process_index() == 0:
    from jax.experimental import multihost_utils
    flat = {"/".join(str(getattr(k, "key", k)) for k in path): np.asarray(v)
            for path, v in jax.tree_util.tree_flatten_with_path(
                multihost_utils.process_allgather(state.params, tiled=True))[0]}
    np.savez(args.out, **flat)
  elif args.out:
    from jax.experimental import multihost_utils
    multihost_utils.process_allgather(state.params, tiled=True)


def _train(args, fx, optim, schedules, train_loop, checkpointing):
  return train_loop.train(
      model=fx.tiny_model(args.num_kv_heads, dropout_rate=0.1),
      train_dataset_cfg=fx.dataset_cfg(batch_size=args.batch_size),
      model_dir=args.model_dir, total_steps=args.total_steps,
      optimizer=optim.Adafactor(learning_rate=schedules.constant(0.05)),
      checkpoint_cfg=checkpointing.CheckpointConfig(period=4, async_save=True),
      eval_period=0, log_period=2, progress=False)


if __name__ == "__main__":
  main()
