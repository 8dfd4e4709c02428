"""The multi-host path for real: two processes on localhost joined by jax.distributed (CPU,
gloo collectives), each reading its own data shard, give the step of one device that sees
both shards; the train loop (sharded data, orbax checkpoint) runs across both."""

import os
import socket
import subprocess

import numpy as np

import trainer_fixtures as fx

CHILD = os.path.join(fx.REPO, "tests", "multihost_child.py")


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _one_device_step():
  import jax
  from gqa_t5 import input_pipeline, optim, partitioning
  from gqa_t5 import trainer as trainer_lib
  fx.register_toy_task()
  cfg = fx.dataset_cfg(batch_size=8)
  shards = [next(input_pipeline.TrainBatches(cfg, i, 2)) for i in range(2)]
  batch = {k: np.concatenate([shards[0][k], shards[1][k]]) for k in shards[0]}
  spec = {k: (v.shape, v.dtype) for k, v in batch.items()}
  trainer = trainer_lib.Trainer(fx.tiny_model(2, dropout_rate=0.1),
                                optim.Adafactor(learning_rate=0.01),
                                partitioning.Partitioner(1, 1, devices=jax.devices()[:1]), spec)
  state, metrics = trainer.train_step(trainer.init_state(), trainer.shard_batch(batch))
  flat = {"/".join(str(getattr(k, "key", k)) for k in path): np.asarray(v)
          for path, v in jax.tree_util.tree_flatten_with_path(jax.device_get(state.params))[0]}
  flat["__loss__"] = np.asarray(float(metrics["loss"]))
  return flat


def test_two_processes_match_one_device(tmp_path):
  coordinator = f"localhost:{_free_port()}"
  env = fx.subprocess_env()
  env["JAX_COMPILATION_CACHE_DIR"] = str(tmp_path / "jax_cache")
  env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
  env["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "-1"
  logs = [open(tmp_path / f"process_{i}.log", "w") for i in range(2)]  # no pipe to fill up
  procs = [subprocess.Popen([fx.PYTHON, CHILD, str(tmp_path / "two.npz"), "--coordinator",
                             coordinator, "--num_processes", "2", "--process_id", str(i),
                             "--loop_dir", str(tmp_path / "loop")],
                            env=env, stdout=logs[i], stderr=subprocess.STDOUT)
           for i in range(2)]
  try:
    one = _one_device_step()  # while the two processes run
    for p in procs:
      p.wait(timeout=900)
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
    for f in logs:
      f.close()
  for i, p in enumerate(procs):
    assert p.returncode == 0, (tmp_path / f"process_{i}.log").read_text()[-3000:]

  two = np.load(tmp_path / "two.npz")
  assert sorted(one) == sorted(two.files)
  for name in one:
    np.testing.assert_allclose(two[name], one[name], rtol=1e-5, atol=1e-7, err_msg=name)
  # The loop's checkpoint was written by both processes together.
  assert os.listdir(tmp_path / "loop" / "checkpoints") == ["2"]
