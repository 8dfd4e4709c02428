"""All-or-nothing writes (gqa_t5/checkpoints/atomic.py) leave what an ordinary write would: the
content, and the permissions the process's umask gives (not the temporary file's private 0600)."""

import errno
import os
import stat

import pytest

import file_limits
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


def test_a_write_the_system_refuses_names_the_file_and_leaves_the_old_one(tmp_path):
  """A real failed write (past a file-size limit, as a full disk fails one): the system's error
  names no file, the one raised names the file being written; the old file stays, no debris."""
  target = tmp_path / "predictions.jsonl"
  atomic.write_text(target, "old")
  out = file_limits.run_with_file_size_limit(
      "from gqa_t5.checkpoints import atomic",
      "try:\n"
      f"  atomic.write_text({str(target)!r}, 'x' * 100_000)\n"
      "except OSError as error:\n"
      "  print(error.errno, error.filename, error.__cause__.filename, sep='|')", limit=4096)
  assert out.strip() == f"{errno.EFBIG}|{target}|None"
  assert target.read_text() == "old" and os.listdir(tmp_path) == ["predictions.jsonl"]
