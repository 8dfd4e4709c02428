"""The XLA:CPU custom calls of `cpu_kernels.cc`: built on first use, loaded, registered.

`gqa_t5/model/products.py` calls them for a decode step's products on a CPU (issue 23: XLA:CPU
runs those few-row matrix products far below the memory bandwidth). There is no build step at
install time: the first CPU trace that wants a kernel compiles `cpu_kernels.cc` with the C++
compiler (`$CXX`, else g++; 3-10 s) against jax's FFI headers, with `-march=native`, into a
per-user cache (`$GQA_T5_KERNEL_CACHE`, else ~/.cache/gqa_t5/cpu_kernels). The file's name is a
digest of the source, the compiler's version, the flags, jax's version and FFI headers and this
CPU's model and flags, so an edit, an upgrade or another machine sharing the home folder builds
its own copy; it is written to a temporary name and renamed, so a build killed half-way leaves
nothing.

Where no compiler is found or the build fails, `load()` says why once (a warning) and returns
None, and the products keep XLA's einsums: slower grouped decode steps on a CPU, same numbers.

  GQA_T5_CPU_KERNELS=0   never use the kernels (XLA's einsums everywhere)
  GQA_T5_CPU_KERNELS=1   require them: an unavailable kernel is an error naming the cause
  (unset)                use them when they build
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Optional, Sequence

import jax

SOURCE = Path(__file__).with_name("cpu_kernels.cc")
ENV = "GQA_T5_CPU_KERNELS"
CACHE_ENV = "GQA_T5_KERNEL_CACHE"
# The FFI targets the source defines, by the name products.py uses.
TARGETS = {"logits": "GqaT5GroupedLogits", "context": "GqaT5GroupedContext",
           "dense": "GqaT5RowsMatmul", "softmax": "GqaT5Softmax",
           "masked_softmax": "GqaT5MaskedSoftmax",
           "thread_count": "GqaT5ThreadCount"}
_FLAGS = ("-O3", "-march=native", "-std=c++17", "-shared", "-fPIC", "-pthread", "-w")


class KernelUnavailableError(RuntimeError):
  """GQA_T5_CPU_KERNELS=1 and the kernels cannot be built or loaded."""


def mode() -> str:
  """'off', 'required' or 'auto', from $GQA_T5_CPU_KERNELS."""
  value = os.environ.get(ENV, "").strip().lower()
  if value in ("0", "false", "off", "no"):
    return "off"
  if value in ("1", "true", "on", "yes", "required"):
    return "required"
  if value in ("", "auto"):
    return "auto"
  raise ValueError(f"{ENV}={os.environ[ENV]!r}: use 0 (never), 1 (required) or leave it unset")


def cache_dir() -> Path:
  return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "gqa_t5" / "cpu_kernels")


def _cpu_fingerprint() -> str:
  """This CPU's model and instruction set (what -march=native compiles for)."""
  fields = {}
  try:
    with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as cpuinfo:
      for line in cpuinfo:
        if not line.strip():
          break  # the first processor's block describes them all
        key, _, value = line.partition(":")
        fields[key.strip()] = value.strip()
  except OSError:
    pass
  return "|".join([platform.machine(), fields.get("model name", ""), fields.get("flags", "")])


def _compiler() -> Optional[str]:
  return shutil.which(os.environ.get("CXX", "g++"))


def _compiler_version(compiler: str) -> str:
  result = subprocess.run([compiler, "--version"], capture_output=True, text=True, check=False)
  return result.stdout.splitlines()[0] if result.stdout else compiler


def library_path(compiler: str) -> Path:
  """Where the build for this source, compiler, jax (its FFI headers) and CPU lives."""
  digest = hashlib.sha256()
  for part in (SOURCE.read_bytes(), _compiler_version(compiler).encode(), " ".join(_FLAGS).encode(),
               jax.__version__.encode(), jax.ffi.include_dir().encode(),
               _cpu_fingerprint().encode()):
    digest.update(part)
    digest.update(b"\0")
  return cache_dir() / f"cpu_kernels-{digest.hexdigest()[:16]}.so"


def build(compiler: str, path: Path, extra_flags: Sequence[str] = ()) -> None:
  """Compiles the source to `path` (temporary name, then rename); raises with the compiler's
  output on failure. `extra_flags` follow -march=native (tests build the narrower instruction
  sets' tiles with them, e.g. -mno-avx512f)."""
  path.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
  os.close(fd)
  try:
    command = [compiler, *_FLAGS, *extra_flags, f"-I{jax.ffi.include_dir()}", str(SOURCE),
               "-o", tmp]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode:
      raise RuntimeError(f"{' '.join(command)} failed ({result.returncode}):\n"
                         + (result.stderr or result.stdout)[-2000:])
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


@functools.lru_cache(maxsize=None)
def _load() -> tuple:
  """(library or None, why not). Builds when missing; registers the FFI targets once."""
  if mode() == "off":
    return None, f"{ENV}=0"
  compiler = _compiler()
  if compiler is None:
    return None, f"no C++ compiler ({os.environ.get('CXX', 'g++')}) on PATH"
  try:
    path = library_path(compiler)
    if not path.exists():
      build(compiler, path)
    library = ctypes.cdll.LoadLibrary(str(path))
    for target in TARGETS.values():
      jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(library, target)),
                                  platform="cpu")
  except (OSError, RuntimeError, AttributeError) as error:
    return None, f"building or loading {SOURCE.name} failed: {error}"
  return library, ""


def load():
  """The loaded library with its targets registered, or None (after one warning saying why)
  when the kernels are off or cannot be built; with GQA_T5_CPU_KERNELS=1 that is an error."""
  library, why = _load()
  if library is None:
    if mode() == "required":
      raise KernelUnavailableError(f"{ENV}=1 but the CPU kernels are unavailable: {why}")
    if mode() == "auto":
      _warn_once(why)
  return library


def available() -> bool:
  return load() is not None


def status() -> str:
  """One line for logs and benchmark records: what CPU decode steps run."""
  library, why = _load()
  if library is None:
    return f"XLA einsums ({why})"
  return f"custom calls of {SOURCE.name} ({Path(library._name).name})"


@functools.lru_cache(maxsize=None)
def _warn_once(why: str) -> None:
  logging.warning("gqa_t5: the CPU decode kernels are unavailable (%s); grouped decode steps "
                  "use XLA's einsums, which are slower on a CPU. Set %s=0 to silence this.",
                  why, ENV)
