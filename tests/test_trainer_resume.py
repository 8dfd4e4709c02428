"""Resumability: SIGTERM or SIGINT during a checkpoint (saved on the way out), SIGKILL during
one, then resume: the final parameters are bitwise those of an uninterrupted run (same batches,
same dropout, same updates)."""

import os
import signal
import subprocess

import numpy as np
import pytest

import trainer_fixtures as fx

CHILD = os.path.join(fx.REPO, "tests", "trainer_child.py")


def _run(model_dir, env, *extra):
  return subprocess.run([fx.PYTHON, CHILD, str(model_dir), "12", *extra], env=env,
                        capture_output=True, text=True, timeout=900)


def _checkpoints(model_dir):
  return sorted(os.listdir(os.path.join(model_dir, "checkpoints")))


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
  """(environment sharing one compilation cache, final parameters of an uninterrupted run)."""
  root = tmp_path_factory.mktemp("straight")
  env = fx.subprocess_env()
  # The runs compile the same programs: share them through JAX's compilation cache.
  env["JAX_COMPILATION_CACHE_DIR"] = str(root / "jax_cache")
  env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
  env["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "-1"
  run = _run(root / "model_dir", env, "--out", str(root / "straight.npz"))
  assert run.returncode == 0, run.stderr[-3000:]
  return env, np.load(root / "straight.npz")


def _assert_bitwise_equal(a, b):
  assert sorted(a.files) == sorted(b.files) and len(a.files) > 20
  for name in a.files:
    assert np.array_equal(a[name], b[name]), name


def test_interrupted_runs_resume_bitwise_equal_to_an_uninterrupted_run(tmp_path, straight):
  """One MODEL_DIR through a preemption, a Ctrl-C and a SIGKILL, then to the end.

  SIGTERM (a preemption) and SIGINT (Ctrl-C) arrive while an async save is in flight: the save
  completes, the step reached is saved too, the exit status is 128 + signal, and no temporary
  directory or traceback is left. SIGKILL mid-save leaves Orbax's temporary directory, which the
  next run removes. The final parameters are bitwise those of an uninterrupted run.
  """
  env, straight_params = straight
  resumed = tmp_path / "resumed"
  # 1-2. SIGTERM, then (resumed) SIGINT, as the step after a checkpoint (every 4 steps) starts.
  for save_step, name, signum in (("4", "TERM", signal.SIGTERM), ("8", "INT", signal.SIGINT)):
    run = _run(resumed, env, "--signal_in_save", f"{save_step}:{name}")
    assert run.returncode == 128 + signum, run.stderr[-3000:]
    reached = str(int(save_step) + 1)  # the step reached after the signal, not a periodic one
    assert (f"stopped by SIG{name} at step {reached}: saved the checkpoint of step {reached}"
            in run.stderr), run.stderr[-3000:]
    assert "Traceback" not in run.stderr, run.stderr[-3000:]
    names = _checkpoints(resumed)
    assert save_step in names and reached in names, names  # the save in flight finished
    assert all(n.isdigit() for n in names), names  # no *.orbax-checkpoint-tmp* debris
    assert not os.path.exists(resumed / "LOCK")  # released on the way out
  assert _checkpoints(resumed) == ["4", "5", "8", "9"]
  # 3. Resume, and SIGKILL while the step-12 checkpoint is being written: it stays a
  #    temporary directory and step 9 remains the latest loadable checkpoint.
  killed = _run(resumed, env, "--kill_in_save", "12")
  assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
  names = _checkpoints(resumed)
  assert "12" not in names and any(n.startswith("12.") and "tmp" in n for n in names), names
  assert os.path.exists(resumed / "LOCK")  # the killed run's: its owner is dead, so stale
  # 4. Resume from step 9 to the end.
  last = _run(resumed, env, "--out", str(tmp_path / "resumed.npz"))
  assert last.returncode == 0, last.stderr[-3000:]
  assert not os.path.exists(resumed / "LOCK")
  assert _checkpoints(resumed) == ["12", "4", "5", "8", "9"]
  _assert_bitwise_equal(straight_params, np.load(tmp_path / "resumed.npz"))
