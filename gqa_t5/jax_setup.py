"""Process set-up shared by the entry points (train, eval, infer) and the benchmarks: JAX's
persistent compilation cache, and logs without the noise of a machine that has no GPU.

`enable_compilation_cache(directory)` turns the cache on (compiled programs are reused by later
processes: a second run of the same shapes starts without compiling). `quiet_logs()` keeps
TensorFlow (the data pipeline's, which never needs a GPU) from printing its CUDA probing and
hides seqio's advice about uncached datasets; errors and every other message still show.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import tempfile
from typing import Iterator, Optional, Sequence

import jax

from gqa_t5 import tpu_topology

# Lines TensorFlow prints while loading and probing CUDA on a machine without a driver.
TF_NOISE = ("Could not find cuda drivers", "failed call to cuInit",
            "All log messages before absl::InitializeLog() is called",
            "oneDNN custom operations are on", "Unable to register cuDNN factory",
            "Unable to register cuFFT factory", "Unable to register cuBLAS factory",
            "computation placer already registered", "TF-TRT Warning")
# Python log messages of seqio that are advice for other set-ups, not problems of this run.
SEQIO_NOISE = ("Using an uncached FunctionDataset",
               "Features not in `features_length` will be removed during packing")


def default_cache_dir() -> str:
  """$XDG_CACHE_HOME/gqa_t5/jax, or ~/.cache/gqa_t5/jax."""
  base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return os.path.join(base, "gqa_t5", "jax")


def enable_compilation_cache(directory: Optional[os.PathLike]) -> Optional[str]:
  """JAX's persistent compilation cache in `directory` (created); None or '' leaves it off.

  Every compilation is cached (no minimum compile time or size): the entry points, benchmarks
  and the reproduction's stages then skip XLA on a second run of the same shapes. Returns the
  directory used.
  """
  if directory is None or not os.fspath(directory):
    return None
  path = os.path.abspath(os.path.expanduser(os.fspath(directory)))
  os.makedirs(path, exist_ok=True)
  jax.config.update("jax_compilation_cache_dir", path)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
  return path


@contextlib.contextmanager
def filtered_stderr(noise: Sequence[str]) -> Iterator[None]:
  """Captures what C++ code writes to file descriptor 2 and writes back every line that
  contains none of `noise` (errors that are not noise still reach the terminal)."""
  sys.stderr.flush()
  saved = os.dup(2)
  with tempfile.TemporaryFile(mode="w+b") as captured:
    os.dup2(captured.fileno(), 2)
    try:
      yield
    finally:
      sys.stderr.flush()
      os.dup2(saved, 2)
      os.close(saved)
      captured.seek(0)
      for line in captured.read().decode("utf-8", "replace").splitlines(keepends=True):
        if not any(n in line for n in noise):
          sys.stderr.write(line)
      sys.stderr.flush()


class _DropPrefixes(logging.Filter):

  def __init__(self, prefixes: Sequence[str]):
    super().__init__()
    self.prefixes = tuple(prefixes)

  def filter(self, record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith(self.prefixes)


def quiet_logs() -> None:
  """Loads TensorFlow (if installed) with its CUDA probing silenced and its GPUs hidden (the
  data pipeline runs on the host; JAX keeps the accelerators), and filters seqio's advice."""
  # TF's C++ INFO and WARNING lines; its errors still show. (tf.data's partial-cache notice came
  # through even so in the main job; tasks/registration.py removes its cause instead.)
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  # libtpu installed only to compile for TPUs (the `tpu` extra): no TPU probing, no warnings.
  tpu_topology.hide_absent_tpu()
  with filtered_stderr(TF_NOISE):
    try:
      import tensorflow as tf  # pylint: disable=g-import-not-at-top  # optional heavy extra
    except ImportError:
      tf = None
    if tf is not None:
      tf.config.set_visible_devices([], "GPU")  # probes CUDA here, inside the filter
      with contextlib.suppress(ImportError):
        import seqio  # pylint: disable=g-import-not-at-top,unused-import  # loads TF's ops
  absl_logger = logging.getLogger("absl")
  if not any(isinstance(f, _DropPrefixes) for f in absl_logger.filters):
    absl_logger.addFilter(_DropPrefixes(SEQIO_NOISE))
