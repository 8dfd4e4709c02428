"""TPU v4 slices as compile targets on a machine with no TPU.

libtpu (the `tpu` extra: `pip install -e '.[tpu]'`) holds TPU's own compiler. With it,
`jax.experimental.topologies.get_topology_desc` describes a slice's chips without any TPU
attached, and `slice_devices(name)` returns them: real `TpuDevice`s that a `Partitioner` meshes
and `jit(...).lower(...).compile()` compiles for, so `memory_analysis()` says what each chip of
the pod would hold (a program that does not fit fails to compile with RESOURCE_EXHAUSTED).

One JAX device per chip (`chip_config_name='megacore'`: a v4 chip's two TensorCores act as one
device, as on a real v4 slice); single-core devices would double every per-device figure.
Slice names count TensorCores as Google's do: v4-256 has 128 chips.
"""

from __future__ import annotations

import dataclasses
import glob
import importlib.metadata
import importlib.util
import os
from typing import Dict, List, Tuple

import jax
from jax.experimental import topologies

from gqa_t5 import perf_model

# The fraction of a chip's available HBM (`perf_model.TPU_V4.available_bytes`, what the compiler
# lets a program use) that a job may plan to use: the rest is headroom for what an ahead-of-time
# compile cannot see (input pipeline buffers, checkpointing copies, fragmentation).
HEADROOM_FRACTION = 0.9


@dataclasses.dataclass(frozen=True)
class TpuSlice:
  """A v4 slice: its name, topology (chips along x, y, z) and whether it is a torus."""
  name: str
  topology: Tuple[int, int, int]

  @property
  def chips(self) -> int:
    x, y, z = self.topology
    return x * y * z

  @property
  def topology_name(self) -> str:
    return "v4:" + "x".join(str(n) for n in self.topology)

  @property
  def wraps(self) -> Tuple[bool, bool, bool]:
    # Slices of a full 4x4x4 cube or more are wired as a 3-D torus; smaller ones are not.
    return (all(n >= 4 for n in self.topology),) * 3

  @property
  def hbm_bytes(self) -> float:
    """What the compiler makes available to a program on each chip."""
    return perf_model.TPU_V4.available_bytes


SLICES: Dict[str, TpuSlice] = {s.name: s for s in (
    TpuSlice("v4-8", (2, 2, 1)),
    TpuSlice("v4-16", (2, 2, 2)),
    TpuSlice("v4-32", (2, 2, 4)),
    TpuSlice("v4-64", (2, 4, 4)),
    TpuSlice("v4-128", (4, 4, 4)),
    TpuSlice("v4-256", (4, 4, 8)),
    TpuSlice("v4-512", (4, 8, 8)),
)}


class TpuCompilerUnavailable(ValueError):
  """libtpu is not installed, so nothing can be compiled for a TPU here (a ValueError, so that
  the entry points report it in one line)."""


def hide_absent_tpu() -> bool:
  """Keeps JAX from probing for TPU chips on a machine that has libtpu only to compile.

  With libtpu installed, every process that starts JAX's backends would load it and print its
  complaints about a missing TPU (accelerator type, worker hostnames). Where no TPU device
  (/dev/accel*, /dev/vfio/N) and no GPU (/dev/nvidia*) exists and JAX_PLATFORMS is unset, JAX
  is told to use the CPU; `slice_devices` still loads libtpu for its compiler. Returns whether
  it did. Call it before JAX's first computation.
  """
  if os.environ.get("JAX_PLATFORMS") or importlib.util.find_spec("libtpu") is None:
    return False
  if glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*") or glob.glob("/dev/nvidia*"):
    return False
  os.environ["JAX_PLATFORMS"] = "cpu"
  jax.config.update("jax_platforms", "cpu")
  return True


def get_slice(name: str) -> TpuSlice:
  """The slice called `name` ('v4-256') or given by topology ('v4:4x4x8')."""
  for s in SLICES.values():
    if name in (s.name, s.topology_name):
      return s
  raise ValueError(f"unknown TPU slice {name!r}; known: "
                   + ", ".join(f"{s.name} ({s.topology_name}, {s.chips} chips)"
                               for s in SLICES.values()))


def libtpu_version() -> str:
  """The installed libtpu's version; raises TpuCompilerUnavailable naming the fix if absent."""
  if importlib.util.find_spec("libtpu") is None:
    raise TpuCompilerUnavailable(
        "compiling for a TPU needs libtpu, which is not installed: pip install -e '.[tpu]' "
        "(about 700 MB; it pins libtpu to the installed jax)")
  try:
    return importlib.metadata.version("libtpu")
  except importlib.metadata.PackageNotFoundError:
    return "unknown"


def slice_devices(name: str) -> List:
  """The devices of slice `name`, one per chip, with no TPU attached."""
  libtpu_version()
  # libtpu keeps a lock file for the one process that may drive the chips; a compile-only
  # process drives none, so several may load it side by side (the tests, a second job).
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  # Without it libtpu prints a warning that it cannot tell which accelerator it is on.
  os.environ.setdefault("TPU_ACCELERATOR_TYPE", "v4-8")
  os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
  s = get_slice(name)
  topology = topologies.get_topology_desc(
      topology_name=s.topology_name, platform="tpu", chip_config_name="megacore",
      chips_per_host_bounds=(2, 2, 1), num_slices=1, wrap=s.wraps)
  devices = list(topology.devices)
  if len(devices) != s.chips:
    raise TpuCompilerUnavailable(f"libtpu described {len(devices)} devices for {s.name}, "
                                 f"expected one per chip ({s.chips})")
  return devices
