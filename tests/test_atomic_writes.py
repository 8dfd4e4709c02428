"""All-or-nothing writes (gqa_t5/checkpoints/atomic.py) leave what an ordinary write would: the
content, and the permissions the process's umask gives (not the temporary file's private 0600)."""

import os
import stat

import pytest

from gqa_t5.checkpoints import atomic


@pytest.fixture(params=[0o022, 0o077, 0o002])
def umask(request):
  previous = os.umask(request.param)
  yield request.param
  os.umask(previous)


def _mode(path) -> int:
  return stat.S_IMODE(os.stat(path).st_mode)


def test_files_and_directories_get_the_umask_permissions(tmp_path, umask):
  atomic.write_text(tmp_path / "report.md", "text\n")
  atomic.write_json(tmp_path / "results.json", {"a": 1})
  with atomic.atomic_directory(str(tmp_path / "checkpoint")) as tmp:
    with open(os.path.join(tmp, "tensor"), "w") as f:
      f.write("x")
  assert (tmp_path / "report.md").read_text() == "text\n"
  assert _mode(tmp_path / "report.md") == 0o666 & ~umask
  assert _mode(tmp_path / "results.json") == 0o666 & ~umask
  assert _mode(tmp_path / "checkpoint") == 0o777 & ~umask
  assert sorted(os.listdir(tmp_path)) == ["checkpoint", "report.md", "results.json"]  # no debris


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
  target = tmp_path / "results.json"
  atomic.write_text(target, "old")
  with pytest.raises(RuntimeError):
    with atomic.open_for_keeps(target) as f:
      f.write("half")
      raise RuntimeError("stopped mid-write")
  assert target.read_text() == "old" and os.listdir(tmp_path) == ["results.json"]
