"""Resumability: SIGKILL after a checkpoint, or during one, then resume: the final parameters
are bitwise those of an uninterrupted run (same batches, same dropout, same updates)."""

import os
import signal
import subprocess

import numpy as np

import trainer_fixtures as fx

CHILD = os.path.join(fx.REPO, "tests", "trainer_child.py")


def _run(model_dir, env, *extra):
  return subprocess.run([fx.PYTHON, CHILD, str(model_dir), "12", *extra], env=env,
                        capture_output=True, text=True, timeout=900)


def _checkpoints(model_dir):
  return sorted(os.listdir(os.path.join(model_dir, "checkpoints")))


def test_killed_runs_resume_bitwise_equal_to_an_uninterrupted_run(tmp_path):
  env = fx.subprocess_env()
  # The four runs compile the same programs: share them through JAX's compilation cache.
  env["JAX_COMPILATION_CACHE_DIR"] = str(tmp_path / "jax_cache")
  env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
  env["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "-1"

  straight = _run(tmp_path / "straight", env, "--out", str(tmp_path / "straight.npz"))
  assert straight.returncode == 0, straight.stderr[-3000:]

  resumed = tmp_path / "resumed"
  # 1. SIGKILL right after the step-8 checkpoint is complete (checkpoints every 4 steps).
  first = _run(resumed, env, "--kill_after_save", "8")
  assert first.returncode == -signal.SIGKILL, first.stderr[-3000:]
  assert _checkpoints(resumed) == ["4", "8"]
  # 2. Resume, and SIGKILL while the step-12 checkpoint is being written: it stays a
  #    temporary directory and step 8 remains the latest loadable checkpoint.
  second = _run(resumed, env, "--kill_in_save", "12")
  assert second.returncode == -signal.SIGKILL, second.stderr[-3000:]
  names = _checkpoints(resumed)
  assert "12" not in names and any(n.startswith("12.") and "tmp" in n for n in names), names
  # 3. Resume from step 8 to the end.
  third = _run(resumed, env, "--out", str(tmp_path / "resumed.npz"))
  assert third.returncode == 0, third.stderr[-3000:]
  assert _checkpoints(resumed) == ["12", "4", "8"]

  a = np.load(tmp_path / "straight.npz")
  b = np.load(tmp_path / "resumed.npz")
  assert sorted(a.files) == sorted(b.files) and len(a.files) > 20
  for name in a.files:
    assert np.array_equal(a[name], b[name]), name
