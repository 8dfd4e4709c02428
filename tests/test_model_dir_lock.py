"""One trainer per MODEL_DIR: the lock file, its stale-owner take-over, and train()'s use of it."""

import json
import os
import socket
import subprocess
import sys
import time

import pytest

from gqa_t5.checkpoints import atomic
from gqa_t5.checkpoints import model_dir as model_dir_lib


def _write_lock(model_dir, **owner):
  os.makedirs(model_dir, exist_ok=True)
  path = os.path.join(model_dir, model_dir_lib.LOCK_FILE)
  with open(path, "w") as f:
    json.dump(owner, f)
  return path


@pytest.fixture
def live_process():
  """Another process of this host that stays alive for the test."""
  child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
  yield child
  child.kill()
  child.wait()


def test_lock_records_its_owner_and_is_removed_on_release(tmp_path):
  model_dir = str(tmp_path / "run")
  with model_dir_lib.ModelDirLock(model_dir) as lock:
    owner = json.load(open(lock.path))
    assert owner["pid"] == os.getpid() and owner["host"] == socket.gethostname()
  assert not os.path.exists(lock.path)


def test_a_live_owner_is_refused_naming_the_process_and_host(tmp_path, live_process):
  model_dir = str(tmp_path / "run")
  path = _write_lock(model_dir, pid=live_process.pid, host=socket.gethostname(),
                     start=atomic._process_start(live_process.pid), since=time.time())
  with pytest.raises(model_dir_lib.ModelDirLocked) as info:
    model_dir_lib.ModelDirLock(model_dir).acquire()
  message = str(info.value)
  for word in (model_dir, f"process {live_process.pid}", socket.gethostname(), path):
    assert word in message, (word, message)
  assert json.load(open(path))["pid"] == live_process.pid  # left alone


def test_a_dead_owner_of_this_host_is_taken_over(tmp_path):
  dead = subprocess.Popen([sys.executable, "-c", "pass"])
  dead.wait()
  model_dir = str(tmp_path / "run")
  _write_lock(model_dir, pid=dead.pid, host=socket.gethostname(), start="1")
  with model_dir_lib.ModelDirLock(model_dir) as lock:
    assert json.load(open(lock.path))["pid"] == os.getpid()


def test_another_hosts_lock_is_stale_only_once_not_refreshed(tmp_path):
  model_dir = str(tmp_path / "run")
  path = _write_lock(model_dir, pid=1, host="some-other-node")
  with pytest.raises(model_dir_lib.ModelDirLocked, match="some-other-node"):
    model_dir_lib.ModelDirLock(model_dir).acquire()
  old = time.time() - model_dir_lib.ModelDirLock.STALE_S - 60
  os.utime(path, (old, old))  # its owner stopped refreshing it: a job requeued elsewhere
  with model_dir_lib.ModelDirLock(model_dir) as lock:
    assert json.load(open(lock.path))["host"] == socket.gethostname()


def test_the_holder_refreshes_its_lock(tmp_path, monkeypatch):
  monkeypatch.setattr(model_dir_lib.ModelDirLock, "HEARTBEAT_S", 0.05)
  with model_dir_lib.ModelDirLock(str(tmp_path / "run")) as lock:
    old = time.time() - 1000
    os.utime(lock.path, (old, old))
    deadline = time.time() + 30  # a hang guard, not a timing assertion
    while os.path.getmtime(lock.path) < time.time() - 500 and time.time() < deadline:
      time.sleep(0.05)
    assert os.path.getmtime(lock.path) > time.time() - 500


def test_a_second_trainer_is_refused_before_writing_anything(tmp_path, live_process):
  pytest.importorskip("seqio")
  import trainer_fixtures as fx
  from gqa_t5 import optim, schedules
  from gqa_t5 import train as train_lib
  fx.register_toy_task()
  model_dir = str(tmp_path / "run")
  _write_lock(model_dir, pid=live_process.pid, host=socket.gethostname(),
              start=atomic._process_start(live_process.pid))
  with pytest.raises(model_dir_lib.ModelDirLocked, match=f"process {live_process.pid}"):
    train_lib.train(model=fx.tiny_model(2), train_dataset_cfg=fx.dataset_cfg(),
                    model_dir=model_dir, total_steps=2,
                    optimizer=optim.Adafactor(learning_rate=schedules.constant(0.05)),
                    eval_period=0, progress=False)
  assert os.listdir(model_dir) == [model_dir_lib.LOCK_FILE]  # no model_config.json, checkpoints
