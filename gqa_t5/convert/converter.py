"""The streaming MHA -> GQA/MQA checkpoint converter.

The source is opened lazily; the output is a mapping of lazy tensors in which every tensor but
the decoder's attention kernels is the source tensor itself (copied bit for bit), and the
decoder's key/value kernels (plus, for 'aligned', the query and out kernels) are computed when
the writer asks for them. Writers take one tensor at a time, so peak memory stays near a few
times the largest tensor whatever the model size. Output goes to a temporary directory beside
the destination and is renamed into place only when complete.

Layouts: a scanned source (stacked `layers`, T5X's scan_layers) is unstacked on opening; the
output is scanned or unrolled as asked (default: as the source). A t5x output also carries t5x's
Adafactor state, zeroed, at the shapes t5x's optimizer gives it (`t5x_state`), so that
`python -m t5x.train` restores it as INITIAL_CHECKPOINT_PATH with no extra flags.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import json
import operator
import os
from typing import Callable, Dict, Iterator, Optional, Tuple

import numpy as np

import gqa_t5
from gqa_t5.checkpoints import checksums as checksums_lib
from gqa_t5.checkpoints import lazy
from gqa_t5.checkpoints import scanned as scanned_lib
from gqa_t5.checkpoints import tree as tree_lib
from gqa_t5.checkpoints.atomic import atomic_directory, prepare_destination, raise_if_interrupted
from gqa_t5.checkpoints.detect import open_checkpoint
from gqa_t5.checkpoints.errors import CheckpointError
from gqa_t5.checkpoints.lazy import LazyTensor
from gqa_t5.checkpoints.orbax_format import write_orbax_item
from gqa_t5.checkpoints.source import CheckpointSource
from gqa_t5.checkpoints.t5x_legacy import T5XWriter
from gqa_t5.convert import calibration as calibration_lib
from gqa_t5.convert import pooling
from gqa_t5.model import grouping
from gqa_t5.model.config import T5Config

OUTPUT_FORMATS = ("t5x", "orbax")
# --optimizer-state of a t5x output: what goes under 'state/param_states' (t5x_state.py).
OPTIMIZER_STATES = ("adafactor", "adafactor-momentum", "none")
PROVENANCE_FILE = "gqa_provenance.json"
_DECODER_ATTENTION = ("self_attention", "encoder_decoder_attention")
_NONFINITE_HINT = ("nothing was written. If they are meant to be there, pass --allow-nonfinite "
                   "(allow_nonfinite=True)")


@dataclasses.dataclass(frozen=True)
class ConversionSpec:
  num_kv_heads: int
  num_cross_kv_heads: Optional[int] = None  # None: same as num_kv_heads
  method: str = "mean"
  seed: int = 0

  @property
  def cross_kv_heads(self) -> int:
    return self.num_kv_heads if self.num_cross_kv_heads is None else self.num_cross_kv_heads


@dataclasses.dataclass(frozen=True)
class CalibrationSpec:
  """Data for aligning on key/value inputs instead of weights (`--method aligned` only)."""
  data: str  # TSV: input<TAB>target
  vocab: str  # SentencePiece model
  input_prefix: str = ""
  input_length: int = 512
  target_length: int = 128
  max_examples: int = 64


def _groups_evenly(num_heads: int, num_kv_heads) -> bool:
  """Whether `num_kv_heads` key/value heads can serve `num_heads` heads (grouping.py's rule)."""
  try:
    grouping.group_size(num_heads, operator.index(num_kv_heads))
  except (TypeError, ValueError):
    return False
  return not isinstance(num_kv_heads, bool)


def _check_target(label: str, target: int, config: T5Config, source_kv: int) -> None:
  n = config.num_heads
  if not _groups_evenly(n, target):
    raise CheckpointError(f"{label}={target!r} does not divide the {n} query heads of the "
                          f"checkpoint; use one of {grouping.valid_kv_heads(n)}")
  if not _groups_evenly(source_kv, target):
    raise CheckpointError(f"{label}={target}: the checkpoint already has {source_kv} key/value "
                          f"heads, and {target} does not divide {source_kv}")


def output_config(config: T5Config, spec: ConversionSpec) -> T5Config:
  k, kc = spec.num_kv_heads, spec.cross_kv_heads
  return config.replace(num_kv_heads=None if k == config.num_heads else k,
                        num_cross_kv_heads=None if kc == k else kc)


class _AlignedLayer:
  """Computes one attention layer's aligned kernels once, hands each out once, then forgets."""

  def __init__(self, source: CheckpointSource, prefix: str, num_heads: int, num_kv_heads: int,
               gram: Optional[np.ndarray] = None):
    self._source, self._prefix = source, prefix
    self._num_heads, self._num_kv_heads = num_heads, num_kv_heads
    self._gram = gram
    self._results: Optional[Dict[str, np.ndarray]] = None
    self._pending = set(("query", "key", "value", "out"))

  def get(self, part: str) -> np.ndarray:
    if self._results is None:
      kernels = [self._source.tensors[f"{self._prefix}/{p}/kernel"].read()
                 for p in ("query", "key", "value", "out")]
      q, k, v, o = pooling.align_attention(*kernels, self._num_heads, self._num_kv_heads,
                                           key_gram=self._gram, value_gram=self._gram)
      del kernels
      self._results = {"query": q, "key": k, "value": v, "out": o}
    value = self._results[part]
    self._pending.discard(part)
    if not self._pending:
      self._results = None  # all four handed out: release the memory
    return value


def plan(source: CheckpointSource, spec: ConversionSpec,
         grams: Optional[Dict[str, np.ndarray]] = None
         ) -> Tuple[Dict[str, LazyTensor], T5Config, Tuple[str, ...]]:
  """(output tensors, output config, names of the tensors that change).

  `grams` ({'decoder/layers_i/<attention>': [D, D]}, from `calibration.input_grams`) makes
  'aligned' align heads on their inputs rather than on the weights.
  """
  config = source.config
  if spec.method not in pooling.METHODS:
    raise CheckpointError(f"unknown conversion method {spec.method!r}; known: "
                          f"{', '.join(pooling.METHODS)}")
  _check_target("num_kv_heads", spec.num_kv_heads, config, config.self_attention_kv_heads)
  _check_target("num_cross_kv_heads", spec.cross_kv_heads, config,
                config.cross_attention_kv_heads)
  out_config = output_config(config, spec)
  tensors = dict(source.tensors)
  changed = []
  n, h = config.num_heads, config.head_dim
  for i in range(config.num_decoder_layers):
    for layer, src_kv, target in (
        ("self_attention", config.self_attention_kv_heads, spec.num_kv_heads),
        ("encoder_decoder_attention", config.cross_attention_kv_heads, spec.cross_kv_heads)):
      prefix = f"decoder/layers_{i}/{layer}"
      if target == src_kv and spec.method != "random":
        continue  # nothing to pool: K equals the source's, the layer is copied unchanged
      if spec.method == "aligned":
        if src_kv != n:
          raise CheckpointError(f"{prefix}: 'aligned' needs a multi-head source; this one has "
                                f"{src_kv} key/value heads for {n} query heads")
        aligned = _AlignedLayer(source, prefix, n, target, (grams or {}).get(prefix))
        for part in ("query", "key", "value", "out"):
          name = f"{prefix}/{part}/kernel"
          old = source.tensors[name]
          shape = (old.shape[0], target * h) if part in ("key", "value") else old.shape
          tensors[name] = LazyTensor(name, shape, old.dtype,
                                     lambda part=part, aligned=aligned: aligned.get(part))
          changed.append(name)
        continue
      for part in ("key", "value"):
        name = f"{prefix}/{part}/kernel"
        old = source.tensors[name]

        def compute(old=old, src_kv=src_kv, target=target, name=name):
          # Pool source key/value heads (src_kv of them; N for an MHA source) into `target`.
          return pooling.pool(old.read(), src_kv, target, spec.method, spec.seed, name)

        tensors[name] = LazyTensor(name, (old.shape[0], target * h), old.dtype, compute)
        changed.append(name)
  return tensors, out_config, tuple(changed)


def _provenance(source: CheckpointSource, spec: ConversionSpec, output_format: str,
                out_config: T5Config, changed,
                calibration: Optional[CalibrationSpec] = None) -> Dict:
  return {
      "tool": "gqa-t5 convert",
      "tool_version": gqa_t5.__version__,
      "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
      "source": os.path.abspath(source.path),
      "source_format": source.format,
      "source_step": source.step,
      "output_format": output_format,
      "method": spec.method,
      "num_kv_heads": spec.num_kv_heads,
      "num_cross_kv_heads": spec.cross_kv_heads,
      "seed": spec.seed,
      "calibration": dataclasses.asdict(calibration) if calibration else None,
      "source_config": tree_lib.config_to_dict(source.config),
      "output_config": tree_lib.config_to_dict(out_config),
      "changed_tensors": list(changed),
      "note": ("the source's optimizer state is not carried over (key/value shapes change); a "
               "t5x output holds t5x's Adafactor state zeroed, as its optimizer starts it"),
  }


def write_tensors(directory: str, tensors: Dict[str, LazyTensor], step: int,
                  output_format: str, progress: Optional[Callable[[str], None]] = None,
                  compression: str = "gzip",
                  param_states: Optional[Dict[str, Tuple[Tuple[int, ...], bool]]] = None) -> None:
  """Writes lazy tensors into an (empty, temporary) directory, one tensor at a time.

  `param_states` ({name: (shape, full)}, t5x only, from `t5x_state.adafactor_state_shapes`):
  optimizer states written as zeros, the full-shaped ones as zarr arrays like the parameters.
  """
  if output_format == "t5x":
    writer = T5XWriter(directory, compression=compression)
    for name, tensor in tensors.items():
      raise_if_interrupted()  # before reading: a stop request should not wait for a read
      if progress:
        progress(name)
      value = tensor.read()
      writer.write(name, value)
      del value
    for name, (shape, full) in (param_states or {}).items():
      zeros = np.zeros(shape, np.float32)
      if full:
        writer.write(name, zeros, part="param_states")
      else:
        writer.write_inline(name, zeros, part="param_states")
      del zeros
    writer.finalize(step)
  elif output_format == "orbax":
    write_orbax_item(directory, tree_lib.unflatten(tensors), step)
  else:
    raise CheckpointError(f"unknown output format {output_format!r}; known: "
                          f"{', '.join(OUTPUT_FORMATS)}")


def _check_paths(input_path: str, output_path: str) -> None:
  """Refuses an output that is, holds, or lies inside the input checkpoint."""
  source, target = os.path.realpath(input_path), os.path.realpath(output_path)
  if source == target:
    raise CheckpointError(f"output path {output_path} is the input path")
  if target.startswith(source.rstrip(os.sep) + os.sep):
    raise CheckpointError(f"output path {output_path} is inside the input checkpoint "
                          f"{input_path}: writing there would change the source")
  if source.startswith(target.rstrip(os.sep) + os.sep):
    raise CheckpointError(f"input checkpoint {input_path} is inside the output path "
                          f"{output_path}: replacing the output would delete the source")


def _missing_parents(path: str):
  """The folders above `path` that do not exist yet, outermost first."""
  missing, parent = [], os.path.dirname(os.path.abspath(path))
  while parent and not os.path.isdir(parent):
    missing.append(parent)
    parent = os.path.dirname(parent)
  return missing[::-1]


@contextlib.contextmanager
def output_parent(path: str) -> Iterator[None]:
  """Creates the missing folders above `path`; removes them again (if still empty) when the
  block fails, so a failed conversion leaves nothing behind."""
  created = _missing_parents(path)
  blocking = [folder for folder in created if os.path.lexists(folder)]
  if blocking:
    raise CheckpointError(f"cannot write the output {path}: {blocking[-1]} is a file, not a "
                          f"folder")
  if created:
    try:
      os.makedirs(created[-1])
    except OSError as error:
      raise CheckpointError(f"cannot create the output's parent folder {created[-1]}: "
                            f"{error}") from error
  try:
    yield
  except BaseException:
    for folder in reversed(created):
      with contextlib.suppress(OSError):
        os.rmdir(folder)
    raise


def _calibration_grams(source: CheckpointSource, calibration: CalibrationSpec):
  batch = calibration_lib.load_tsv_examples(
      calibration.data, calibration.vocab, calibration.input_prefix, calibration.input_length,
      calibration.target_length, calibration.max_examples)
  return calibration_lib.input_grams(source.config, source.read_all(), batch)


def convert(input_path: str, output_path: str, spec: ConversionSpec,
            input_format: str = "auto", output_format: str = "t5x", overwrite: bool = False,
            progress: Optional[Callable[[str], None]] = None, compression: str = "gzip",
            calibration: Optional[CalibrationSpec] = None, allow_nonfinite: bool = False,
            scan_layers: Optional[bool] = None, optimizer_state: str = "adafactor",
            checksums: bool = True) -> Dict:
  """Converts a checkpoint and returns its provenance record (also written beside it).

  `scan_layers`: write stacked `layers` (T5X's scanned layout) or unrolled `layers_<i>`; None:
  as the source. `optimizer_state` (t5x output only): 'adafactor' (t5x's T5.1.1 Adafactor,
  no momentum), 'adafactor-momentum' (Adafactor with beta1) or 'none' (parameters only: t5x
  then needs `fallback_to_scratch` and an `assignment_map` to restore it).
  `checksums`: record a CRC-32 of every tensor written in the record's 'checksums' (what
  `gqa-t5 verify` checks; see checkpoints/checksums.py).

  Streams one tensor at a time, except that `calibration` first loads the whole model once to
  measure the key/value inputs of each decoder attention layer. Every tensor written is checked
  finite unless `allow_nonfinite`. Temporary directories that interrupted runs left beside
  `output_path` are removed first (see `checkpoints.atomic`).
  """
  if output_format not in OUTPUT_FORMATS:
    raise CheckpointError(f"unknown output format {output_format!r}; known: "
                          f"{', '.join(OUTPUT_FORMATS)}")
  if optimizer_state not in OPTIMIZER_STATES:
    raise CheckpointError(f"unknown optimizer state {optimizer_state!r}; known: "
                          f"{', '.join(OPTIMIZER_STATES)}")
  _check_paths(input_path, output_path)
  with output_parent(output_path):
    return _convert(input_path, output_path, spec, input_format, output_format, overwrite,
                    progress, compression, calibration, allow_nonfinite, scan_layers,
                    optimizer_state, checksums)


def _convert(input_path, output_path, spec, input_format, output_format, overwrite, progress,
             compression, calibration, allow_nonfinite, scan_layers, optimizer_state,
             checksums) -> Dict:
  prepare_destination(output_path, overwrite)  # fail before reading anything
  if calibration is not None and spec.method != "aligned":
    raise CheckpointError(f"calibration data only applies to --method aligned, not "
                          f"{spec.method!r}")
  source = open_checkpoint(input_path, format=input_format)
  grams = None if calibration is None else _calibration_grams(source, calibration)
  tensors, out_config, changed = plan(source, spec, grams)
  if not allow_nonfinite:
    tensors = {name: lazy.finite_checked(t, source.path, _NONFINITE_HINT)
               for name, t in tensors.items()}
  scan = source.scanned if scan_layers is None else bool(scan_layers)
  out_config = out_config.replace(scan_layers=scan)
  if scan:
    tensors = scanned_lib.stack(tensors)
  param_states = None
  if output_format == "t5x" and optimizer_state != "none":
    # flax (the network's logical axes) only for a t5x output with optimizer state.
    from gqa_t5.convert import t5x_state  # pylint: disable=import-outside-toplevel
    param_states = t5x_state.adafactor_state_shapes(
        out_config, {n: t.shape for n, t in tensors.items()},
        momentum=optimizer_state == "adafactor-momentum")
  record = _provenance(source, spec, output_format, out_config, changed, calibration)
  record.update(allow_nonfinite=allow_nonfinite, source_scanned=source.scanned,
                scan_layers=scan, optimizer_state=optimizer_state if output_format == "t5x"
                else "none")
  sums: Dict[str, str] = {}
  if checksums:
    tensors = {name: checksums_lib.checksummed(t, sums) for name, t in tensors.items()}
  with atomic_directory(output_path, overwrite=overwrite) as tmp:
    write_tensors(tmp, tensors, source.step, output_format, progress, compression,
                  param_states)
    if checksums:
      missing = sorted(set(tensors) - set(sums))
      if missing:  # a writer that skipped the wrapper's read: never record a partial table
        raise CheckpointError(f"no checksum was taken of {missing[:5]} while writing")
      record["checksums"] = dict(sorted(sums.items()))
    with open(os.path.join(tmp, PROVENANCE_FILE), "w") as f:
      json.dump(record, f, indent=2)
  return record


def convert_params(params: Dict, config: T5Config, spec: ConversionSpec,
                   grams: Optional[Dict[str, np.ndarray]] = None,
                   allow_nonfinite: bool = False) -> Tuple[Dict, T5Config]:
  """In-memory conversion of a parameter tree (for experiments and tests)."""
  flat = tree_lib.flatten(params)
  tensors = {name: lazy.from_array(name, np.asarray(value)) for name, value in flat.items()}
  source = CheckpointSource(path="<memory>", format="memory", tensors=tensors, config=config)
  out, out_config, _ = plan(source, spec, grams)
  if not allow_nonfinite:
    out = {name: lazy.finite_checked(t, "the parameters", _NONFINITE_HINT)
           for name, t in out.items()}
  return tree_lib.unflatten({name: t.read() for name, t in out.items()}), out_config
