"""What a compiled program needs per device, read from the compiler, and whether it fits.

`program_figures(compiled)` turns XLA's `memory_analysis()` and `cost_analysis()` into one
record (arguments, outputs, aliased bytes, temporaries, generated code, peak, FLOPs, bytes
accessed, XLA's own time estimate). `compile_figures(lowered)` compiles and returns it; when
the TPU compiler refuses a program for want of memory (RESOURCE_EXHAUSTED) the figures say so,
with the bytes the compiler asked for, instead of raising. `check_fits` turns a record into a
verdict and, for a program that does not fit, names what would make it fit.

Caveats the figures carry (see docs/REPRODUCE.md): loop bodies (a scanned layer stack, a
`while` decode loop) are counted once by `cost_analysis`, so its FLOPs and bytes of such a
program are per iteration, not per step; `optimal_seconds` is XLA's estimate, not a
measurement, and can come out negative on large TPU programs.

The train step is lowered by `Trainer.lower_train_step`; `abstract_params` and `lower_predict`
lower what evaluation runs (greedy or beam decoding of a batch) the same way, from shapes alone.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
from typing import Any, Dict, List, Mapping, Optional

import jax
import jax.numpy as jnp

from gqa_t5 import partitioning
from gqa_t5.checkpoints import atomic

_GIB = 2.0 ** 30
# "Used 78.73G of 30.75G hbm" / "HLO temporaries (78.73G) exceeds available HBM (30.75G)".
_UNIT = {"K": 2.0 ** 10, "M": 2.0 ** 20, "G": 2.0 ** 30, "T": 2.0 ** 40}
_USED = re.compile(r"Used ([0-9.]+)([KMGT]) of ([0-9.]+)([KMGT]) hbm")
_TEMPS = re.compile(r"HLO temporaries \(([0-9.]+)([KMGT])\) exceeds available HBM "
                    r"\(([0-9.]+)([KMGT])\)")


@dataclasses.dataclass
class ProgramFigures:
  """Per-device figures of one compiled program (bytes, FLOPs, seconds).

  peak_bytes: arguments + outputs - aliased (donated) + temporaries + generated code: what the
    device holds while the program runs. `fits` is False when the compiler refused it for want
    of memory; `needed_bytes` is then what the compiler asked for (its figure may count only
    part of the program), and the other byte fields are zero.
  """
  argument_bytes: float = 0.0
  output_bytes: float = 0.0
  alias_bytes: float = 0.0
  temp_bytes: float = 0.0
  code_bytes: float = 0.0
  flops: Optional[float] = None
  bytes_accessed: Optional[float] = None
  xla_seconds: Optional[float] = None
  compiled: bool = True
  needed_bytes: Optional[float] = None
  error: str = ""

  @property
  def peak_bytes(self) -> float:
    if not self.compiled:
      return self.needed_bytes or 0.0
    return (self.argument_bytes + self.output_bytes - self.alias_bytes + self.temp_bytes
            + self.code_bytes)

  def to_dict(self) -> Dict[str, Any]:
    return {**dataclasses.asdict(self), "peak_bytes": self.peak_bytes}

  @classmethod
  def from_dict(cls, d: Dict[str, Any]) -> "ProgramFigures":
    fields = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in d.items() if k in fields})


def program_figures(compiled) -> ProgramFigures:
  """The figures of a `jax.stages.Compiled`."""
  memory = compiled.memory_analysis()
  cost = compiled.cost_analysis() or {}
  if isinstance(cost, (list, tuple)):  # older jax returned one dict per device program
    cost = cost[0] if cost else {}
  figures = ProgramFigures()
  if memory is not None:
    figures.argument_bytes = float(memory.argument_size_in_bytes)
    figures.output_bytes = float(memory.output_size_in_bytes)
    figures.alias_bytes = float(getattr(memory, "alias_size_in_bytes", 0))
    figures.temp_bytes = float(memory.temp_size_in_bytes)
    figures.code_bytes = float(getattr(memory, "generated_code_size_in_bytes", 0))
  if "flops" in cost:
    figures.flops = float(cost["flops"])
  if "bytes accessed" in cost:
    figures.bytes_accessed = float(cost["bytes accessed"])
  if "optimal_seconds" in cost:
    figures.xla_seconds = float(cost["optimal_seconds"])
  return figures


def is_out_of_memory(error: BaseException) -> bool:
  return "RESOURCE_EXHAUSTED" in str(error)


def needed_bytes_from_error(message: str) -> Optional[float]:
  """The bytes a RESOURCE_EXHAUSTED compile error says the program needs, if it says."""
  for pattern in (_USED, _TEMPS):
    match = pattern.search(message)
    if match:
      return float(match.group(1)) * _UNIT[match.group(2)]
  return None


def program_digest(lowered) -> str:
  """A digest of the lowered program itself (StableHLO text, no source locations). Lowering
  takes seconds where compiling takes minutes, and the program is exactly what a compile
  depends on: a change of code that leaves the program alone (a docstring, a module split)
  keeps a cached result, and any change that alters the program misses it."""
  return hashlib.sha256(lowered.as_text().encode()).hexdigest()


def compile_figures(lowered, cache_dir: Optional[str] = None, context: str = ""
                    ) -> ProgramFigures:
  """Compiles `lowered` (a `jax.stages.Lowered`); a program refused for want of memory comes
  back with `compiled=False` and the compiler's figure, any other error is raised.

  With `cache_dir`, the figures are kept there under a digest of the program, `context` (what
  the program text does not say: the target's name) and the jax version, and a program
  compiled before is not compiled again."""
  path = None
  if cache_dir:
    material = json.dumps([program_digest(lowered), context, jax.__version__])
    path = os.path.join(cache_dir, hashlib.sha256(material.encode()).hexdigest()[:32] + ".json")
    if os.path.exists(path):
      with open(path) as f:
        return ProgramFigures.from_dict(json.load(f))
  figures = _compile_figures(lowered)
  if path:
    os.makedirs(cache_dir, exist_ok=True)
    atomic.write_json(path, figures.to_dict(), indent=1)
  return figures


def _compile_figures(lowered) -> ProgramFigures:
  try:
    return program_figures(lowered.compile())
  except Exception as error:  # pylint: disable=broad-except  # XlaRuntimeError and kin
    if not is_out_of_memory(error):
      raise
    message = str(error)
    first = next((line for line in message.splitlines() if "RESOURCE_EXHAUSTED" in line),
                 message[:300])
    return ProgramFigures(compiled=False, needed_bytes=needed_bytes_from_error(message),
                          error=first.strip()[:500])


def gib(n: Optional[float]) -> str:
  """Bytes for people: GiB from a quarter of one, MiB below."""
  if n is None:
    return "-"
  return f"{n / _GIB:.2f} GiB" if abs(n) >= _GIB / 4 else f"{n / 2 ** 20:.1f} MiB"


@dataclasses.dataclass
class FitVerdict:
  fits: bool
  within_headroom: bool
  text: str
  remedies: List[str]


def check_fits(figures: ProgramFigures, hbm_bytes: float, headroom_fraction: float = 0.9, *,
               what: str = "the program", remedies: Optional[List[str]] = None) -> FitVerdict:
  """Whether `figures` fit a device of `hbm_bytes`, and within `headroom_fraction` of it.

  `remedies`: the changes that would make this program fit, best first (the caller knows its
  job's knobs); they are only reported for a program that does not fit within the headroom.
  """
  peak = figures.peak_bytes
  budget = hbm_bytes * headroom_fraction
  fits = figures.compiled and peak <= hbm_bytes
  within = fits and peak <= budget
  if not figures.compiled:
    needed = (f"needs {gib(figures.needed_bytes)}" if figures.needed_bytes
              else "needs more than it has")
    text = (f"{what} does not fit: the TPU compiler refused it ({needed} of "
            f"{gib(hbm_bytes)} per chip)")
  elif not fits:
    text = f"{what} does not fit: {gib(peak)} per chip of {gib(hbm_bytes)}"
  elif not within:
    text = (f"{what} fits without headroom: {gib(peak)} per chip, over "
            f"{headroom_fraction:.0%} of {gib(hbm_bytes)}")
  else:
    text = f"{what} fits: {gib(peak)} per chip of {gib(hbm_bytes)} ({peak / hbm_bytes:.0%})"
  shown = list(remedies or []) if not within else []
  if shown:
    text += "; to make it fit: " + "; or ".join(shown)
  return FitVerdict(fits, within, text, shown)


def abstract_params(model, partitioner):
  """The model's parameters as ShapeDtypeStructs carrying the partitioner's shardings."""
  config = getattr(model.module, "config", None)
  if config is not None:
    partitioner.setup_for(config)
  abstract, axes = partitioning.abstract_params_and_axes(model)
  shardings = partitioner.shardings(axes)
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                      abstract, shardings)


def lower_predict(model, partitioner, batch_size: int, input_length: int, target_length: int,
                  decode_kwargs: Optional[Mapping[str, Any]] = None):
  """`model.predict_batch_with_aux` on a [batch_size, input_length] batch, decoding
  `target_length` tokens, lowered from shapes alone for the partitioner's devices."""
  params = abstract_params(model, partitioner)
  data = partitioner.data_sharding(2)
  batch = {"encoder_input_tokens": jax.ShapeDtypeStruct((batch_size, input_length), jnp.int32,
                                                        sharding=data),
           "decoder_input_tokens": jax.ShapeDtypeStruct((batch_size, target_length), jnp.int32,
                                                        sharding=data)}
  kwargs = dict(decode_kwargs or {})

  def predict(p, b):
    return model.predict_batch_with_aux(p, b, **kwargs)

  with partitioner.mesh, partitioner.axis_rules():
    return jax.jit(predict).lower(params, batch)
