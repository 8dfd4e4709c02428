"""Interrupted conversions: SIGINT/SIGTERM stop cleanly, SIGKILL debris is removed by the next run.

The child is `gqa-t5 convert` with every tensor read slowed down (checkpoint_fixtures.slow_convert),
so a signal sent after a few reads lands mid-write.
"""

import json
import os
import signal
import subprocess
import sys

import pytest

from checkpoint_fixtures import entries
from tiny_configs import tiny_config
from gqa_t5.checkpoints import atomic, synthetic, t5x_legacy, orbax_format

TESTS = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(TESTS)


@pytest.fixture
def source(tmp_path):
  path = str(tmp_path / "mha")
  synthetic.write_t5x(path, tiny_config("checkpoint"), compression="none")
  return path


def _start(argv, delay=0.3):
  path = os.pathsep.join([TESTS, ROOT, os.environ.get("PYTHONPATH", "")])
  env = dict(os.environ, PYTHONPATH=path)
  code = "import sys, checkpoint_fixtures as f; sys.exit(f.slow_convert(sys.argv[1:], %r))" % delay
  return subprocess.Popen([sys.executable, "-c", code, *map(str, argv)], env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _interrupt_after_reads(child, reads, signum):
  """Waits for `reads` tensor reads, sends `signum`, returns (exit status, stderr)."""
  seen = 0
  for line in child.stdout:
    seen += line.startswith("read ")
    if seen >= reads:
      break
  assert seen >= reads, child.stderr.read()[-3000:]
  child.send_signal(signum)
  _, err = child.communicate(timeout=900)  # a hang guard, not a speed check
  return child.returncode, err


def _temporaries(directory, name):
  return [e for e in entries(directory) if e.startswith(f".{name}.")]


@pytest.mark.parametrize("signum,fmt", [(signal.SIGTERM, "t5x"), (signal.SIGINT, "orbax")])
def test_signal_mid_write_stops_writers_and_leaves_nothing(tmp_path, source, signum, fmt):
  out = tmp_path / "gqa"
  child = _start(["--input", source, "--output", out, "--output-format", fmt,
                  "--num-kv-heads", 2])
  code, err = _interrupt_after_reads(child, reads=6, signum=signum)
  assert code == 128 + signum, err[-3000:]
  assert f"stopped by {signal.Signals(signum).name}" in err and "Traceback" not in err, err
  assert not out.exists()
  assert entries(tmp_path) == ["mha"]  # the temporary directory is gone, nothing rewrote it


def test_sigkill_debris_is_removed_by_the_next_run(tmp_path, source):
  out = tmp_path / "gqa"
  child = _start(["--input", source, "--output", out, "--num-kv-heads", 2])
  code, _ = _interrupt_after_reads(child, reads=6, signum=signal.SIGKILL)
  assert code == -signal.SIGKILL
  debris = _temporaries(tmp_path, "gqa")
  assert len(debris) == 1 and not out.exists()
  marker = json.load(open(tmp_path / debris[0] / atomic.MARKER))
  assert marker["pid"] == child.pid and marker["target"] == str(out)
  # Not ours (no marker): never deleted, whatever its name.
  foreign = tmp_path / ".gqa.tmp-foreign"
  foreign.mkdir()
  (foreign / "keep").write_text("x")
  child = _start(["--input", source, "--output", out, "--num-kv-heads", 2], delay=0)
  _, err = child.communicate(timeout=900)  # a hang guard, not a speed check
  assert child.returncode == 0, err[-3000:]
  assert f"removed {tmp_path / debris[0]}" in err
  assert entries(tmp_path) == [".gqa.tmp-foreign", "gqa", "mha"]
  assert t5x_legacy.load_t5x(str(out))[0]["decoder"]["layers_0"]["self_attention"]["key"][
      "kernel"].shape == (16, 16)
  assert atomic.MARKER not in os.listdir(out)


def _marked(tmp_path, name, target, pid, host=None):
  directory = tmp_path / name
  directory.mkdir()
  owner = dict(atomic.process_owner(), pid=pid, start=atomic._process_start(pid), target=str(target))
  if host:
    owner["host"] = host
  (directory / atomic.MARKER).write_text(json.dumps(owner))
  return directory


def test_only_our_dead_temporaries_are_removed(tmp_path):
  target = tmp_path / "out"
  alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
  dead = subprocess.Popen([sys.executable, "-c", "pass"])
  dead.wait()
  try:
    stale = _marked(tmp_path, ".out.tmp-dead", target, dead.pid)
    _marked(tmp_path, ".out.tmp-alive", target, alive.pid)  # a conversion still running
    reused = _marked(tmp_path, ".out.tmp-reused", target, alive.pid)
    marker = json.loads((reused / atomic.MARKER).read_text())
    (reused / atomic.MARKER).write_text(json.dumps(dict(marker, start="1")))  # pid reused since
    _marked(tmp_path, ".out.tmp-remote", target, dead.pid, host="another-host")
    _marked(tmp_path, ".other.tmp-dead", tmp_path / "other", dead.pid)  # another target
    _marked(tmp_path, ".out.tmp-elsewhere", tmp_path / "x" / "out", dead.pid)
    (tmp_path / ".out.tmp-unmarked").mkdir()
    (tmp_path / "real").mkdir()
    (tmp_path / atomic.MARKER).write_text("{}")
    os.symlink(tmp_path / "real", tmp_path / ".out.tmp-link")
    assert atomic.remove_stale_temporaries(str(target)) == [str(stale), str(reused)]
    assert entries(tmp_path) == sorted([
        atomic.MARKER, ".other.tmp-dead", ".out.tmp-alive", ".out.tmp-elsewhere",
        ".out.tmp-link", ".out.tmp-remote", ".out.tmp-unmarked", "real"])
  finally:
    alive.kill()
    alive.wait()


def test_original_moved_aside_by_a_killed_overwrite_is_put_back(tmp_path):
  target = tmp_path / "out"
  dead = subprocess.Popen([sys.executable, "-c", "pass"])
  dead.wait()
  old = _marked(tmp_path, ".out.old-abc", target, dead.pid)
  (old / "out").mkdir()
  (old / "out" / "checkpoint").write_text("the original")
  assert atomic.remove_stale_temporaries(str(target)) == [str(old)]
  assert entries(tmp_path) == ["out"]
  assert (target / "checkpoint").read_text() == "the original"


def test_in_process_interrupt_between_tensors_removes_the_partial_output(tmp_path):
  params = synthetic.random_params(tiny_config("checkpoint"))
  out = tmp_path / "ckpt"
  writes = []
  original = t5x_legacy.T5XWriter.write

  def write(self, name, value):
    writes.append(name)
    if len(writes) == 3:
      os.kill(os.getpid(), signal.SIGTERM)  # noted, not raised: the writer stops itself
    return original(self, name, value)

  t5x_legacy.T5XWriter.write = write
  try:
    with pytest.raises(atomic.Interrupted) as error:
      t5x_legacy.save_t5x(str(out), params)
  finally:
    t5x_legacy.T5XWriter.write = original
  assert error.value.exit_code == 143 and len(writes) == 3  # stopped before the next tensor
  assert entries(tmp_path) == []
  assert signal.getsignal(signal.SIGTERM) is not atomic._on_signal  # handlers restored
  orbax_format.save_orbax(str(out), params)  # and a later write works
  assert entries(tmp_path) == ["ckpt"]


def test_signal_before_publishing_discards_and_during_publishing_keeps(tmp_path, monkeypatch):
  # A shell that starts this run in the background ignores SIGINT, and the writer leaves an
  # ignored signal ignored (by design): give the test an ordinary SIGINT disposition.
  previous = signal.signal(signal.SIGINT, signal.default_int_handler)
  try:
    _check_signals_around_publishing(tmp_path, monkeypatch)
  finally:
    signal.signal(signal.SIGINT, previous)


def _check_signals_around_publishing(tmp_path, monkeypatch):
  out = tmp_path / "ckpt"
  with pytest.raises(atomic.Interrupted) as error:
    with atomic.atomic_directory(str(out)) as tmp:
      assert os.path.exists(os.path.join(tmp, atomic.MARKER))  # ours from the start
      os.kill(os.getpid(), signal.SIGINT)  # after the last tensor, before the rename
  assert error.value.exit_code == 130 and not error.value.completed
  assert entries(tmp_path) == []
  publish = atomic._publish

  def publish_then_signal(*args):
    publish(*args)
    os.kill(os.getpid(), signal.SIGTERM)  # too late to undo: the output is whole

  monkeypatch.setattr(atomic, "_publish", publish_then_signal)
  with pytest.raises(atomic.Interrupted) as error:
    with atomic.atomic_directory(str(out)) as tmp:
      with open(os.path.join(tmp, "data"), "w") as f:
        f.write("complete")
  assert error.value.exit_code == 143 and error.value.completed
  assert entries(tmp_path) == ["ckpt"] and entries(out) == ["data"]  # marker removed
