"""What the benchmarks share: start-up clock, compilation cache, progress lines, checks, JSON.

Every benchmark reports seconds since its process started (read from /proc, so interpreter
start-up and imports count), prints a progress line before any wait that may pass ~10 s, judges
its targets as PASS/FAIL checks and can write its figures and checks to a JSON file.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import os
import time
from typing import Any, Callable, Dict, List, Mapping, Optional

import jax

from gqa_t5 import jax_setup
from gqa_t5.checkpoints import atomic

# Fallback clock origin where /proc is missing: when the benchmark package was first imported.
_IMPORTED_AT = time.time()
DEFAULT_CACHE_DIR = jax_setup.default_cache_dir()


def process_start_time() -> float:
  """Wall-clock time (time.time()) at which this process started."""
  try:
    with open("/proc/self/stat") as f:
      fields = f.read().rsplit(")", 1)[1].split()
    started_ticks = int(fields[19])  # field 22 (starttime), after pid and (comm)
    with open("/proc/uptime") as f:
      uptime = float(f.read().split()[0])
    return time.time() - uptime + started_ticks / os.sysconf("SC_CLK_TCK")
  except (OSError, ValueError, IndexError):
    return _IMPORTED_AT


_STARTED_AT = process_start_time()


def since_start() -> float:
  """Seconds since this process started."""
  return time.time() - _STARTED_AT


def progress(message: str) -> None:
  """One line, stamped with seconds since process start, flushed at once."""
  print(f"[{since_start():7.1f}s] {message}", flush=True)


def add_common_flags(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("--smoke", action="store_true",
                      help="tiny dims, few steps, float32: every code path in seconds on a CPU")
  parser.add_argument("--json", default=None, help="also write figures and checks to this file")
  parser.add_argument("--jax-cache-dir", default=DEFAULT_CACHE_DIR,
                      help="JAX persistent compilation cache ('' to disable; default "
                           f"{DEFAULT_CACHE_DIR})")


def positive_int(text: str) -> int:
  """An argparse type: a whole number of at least 1 (a batch, a length, a count)."""
  try:
    value = int(text)
  except ValueError:
    raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
  if value < 1:
    raise argparse.ArgumentTypeError(f"{value} is not positive (at least 1)")
  return value


def compile_parallel(lowered: Mapping[str, Any]) -> Dict[str, Any]:
  """Compiles lowered computations concurrently (XLA compiles outside the GIL)."""
  if not lowered:
    return {}
  progress("compiling " + ", ".join(lowered) + " ...")
  workers = min(len(lowered), os.cpu_count() or 1)
  with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as pool:
    futures = {name: pool.submit(low.compile) for name, low in lowered.items()}
    return {name: future.result() for name, future in futures.items()}


def timed(fn: Callable[[], Any]) -> float:
  """Seconds one call of `fn` takes, its device work included."""
  start = time.perf_counter()
  jax.block_until_ready(fn())
  return time.perf_counter() - start


def check(name: str, passed: bool, detail: str) -> Dict[str, Any]:
  return {"name": name, "passed": bool(passed), "detail": detail}


def print_checks(checks: List[Dict[str, Any]]) -> None:
  """The benchmark's targets, PASS or FAIL each. They are reports: a benchmark's exit status
  does not depend on them (a target may not apply to this machine), and the header says so."""
  if checks:
    print("targets (reported for information; the exit status does not depend on them):")
  for item in checks:
    print(f"{'PASS' if item['passed'] else 'FAIL'}  {item['name']}: {item['detail']}")


def device_facts() -> Dict[str, Any]:
  device = jax.devices()[0]
  stats = {}
  try:
    stats = device.memory_stats() or {}
  except Exception:  # pylint: disable=broad-except  # backends without memory statistics
    pass
  return {"backend": jax.default_backend(), "device_kind": device.device_kind,
          "device_count": jax.device_count(), "memory_bytes_limit": stats.get("bytes_limit"),
          "jax_version": jax.__version__}


def write_json(path: Optional[str], results: Mapping[str, Any]) -> None:
  """Writes `results` to `path` (temporary file, then rename); no-op without a path."""
  if not path:
    return
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  atomic.write_json(path, results, indent=2, default=_jsonable)


def _jsonable(value):
  if hasattr(value, "item"):
    return value.item()
  return str(value)
