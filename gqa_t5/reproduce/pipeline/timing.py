"""Stage 5: decode time per sample and per step for every key/value head count, with the decode
benchmark's method (`gqa_t5.benchmarks.decode`): fixed-length greedy decoding (no early stop),
compiled encode and decode loop timed apart, best of several repeats, and this machine's memory
bandwidth measured in the same run.

Time does not depend on the weights' values, so each K is timed on randomly initialised weights:
  * `measure`: the preset's own model, runs of different K interleaved so drift hits all alike;
    every fine-tuned variant with that K shares its time;
  * `measure_paper_shapes`: the paper's Table 1 / Fig. 6 shapes (T5.1.1-XXL for each K,
    MHA-Large; bf16, input 2048, output 512), one K at a time so only one model is in memory.
Both run in a fresh Python process: after training and evaluation this one holds tf.data worker
threads and a fragmented heap, which made one K's steps twice as slow as in a clean process.
The child's progress lines ("timing K=...") are passed on as they come.
"""

from __future__ import annotations

import contextlib
import gc
import io
import json
import os
import subprocess
import sys
import time
from typing import Callable, Dict, List, Sequence

import jax.numpy as jnp

from gqa_t5.benchmarks import decode
from gqa_t5.model.config import T5Config
from gqa_t5.reproduce.pipeline import variants as variants_lib

PROGRESS_PREFIX = "timing: "


def _child(request: Dict, log: Callable[[str], None]) -> Dict:
  # The training process still holds its accelerator memory: allocate on demand, not 75%.
  env = {**os.environ, "XLA_PYTHON_CLIENT_PREALLOCATE": "false"}
  process = subprocess.Popen([sys.executable, "-m", __name__], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
  process.stdin.write(json.dumps(request))
  process.stdin.close()
  tail: List[str] = []
  for line in process.stderr:
    if line.startswith(PROGRESS_PREFIX):
      log("  " + line[len(PROGRESS_PREFIX):].rstrip())
    else:
      tail = (tail + [line])[-60:]
  out = process.stdout.read()
  if process.wait() != 0:
    raise RuntimeError(f"the decode-timing process failed (exit {process.returncode}):\n"
                       + "".join(tail)[-4000:])
  return json.loads(out.strip().splitlines()[-1])


def measure(config: T5Config, kv_heads: Sequence[int], *, batch: int, input_length: int,
            output_length: int, repeats: int, bandwidth_gb: float = 0.25,
            log: Callable[[str], None] = print) -> Dict:
  """{'kv_heads': {K: {...}}, 'bandwidth_bytes_per_s': ...} for the preset's model."""
  return _child({"kind": "preset", "config": variants_lib.config_dict(config),
                 "kv_heads": list(kv_heads), "batch": batch, "input_length": input_length,
                 "output_length": output_length, "repeats": repeats,
                 "bandwidth_gb": bandwidth_gb}, log)


def measure_paper_shapes(timings: Sequence[variants_lib.PaperTiming], bandwidth_gb: float,
                         log: Callable[[str], None] = print) -> Dict:
  """{'runs': {size: {'kv_heads': {K: {...}}, 'shape': ...}}, 'bandwidth_bytes_per_s': ...}
  (T5.1.1's vocabulary of 32,128, as at paper scale)."""
  return _child({"kind": "paper", "timings": [t.__dict__ for t in timings],
                 "bandwidth_gb": bandwidth_gb}, log)


def _benchmark(config: T5Config, kv_heads: Sequence[int], *, batch: int, input_length: int,
               output_length: int, repeats: int, bandwidth_gb: float) -> Dict:
  """Runs the decode benchmark in this process; its figures in the stage's format."""
  request = decode.Request(
      config=config, kv_heads=tuple(sorted(set(kv_heads), reverse=True)),
      input_length=input_length, output_length=output_length, batch=batch, repeats=repeats,
      bandwidth_mib=max(1, int(bandwidth_gb * 1024)), jax_cache_dir="")
  # The benchmark's own lines ("compiling K=...", "timing round ...") become progress lines.
  with contextlib.redirect_stdout(_ProgressWriter()):
    result = decode.run(request)
  encode_per_sample = result["encode_s"] / batch
  per_k = {}
  for r in result["per_k"]:
    step = r["step_ms_min"] / 1e3
    per_k[str(r["kv_heads"])] = {
        "kv_heads": r["kv_heads"],
        "time_per_sample": encode_per_sample + step * output_length / batch,
        "decode_time_per_sample": step * output_length / batch,
        "encode_time_per_sample": encode_per_sample, "time_per_step": step,
        "time_per_step_median": r["step_ms_median"] / 1e3,
        "bytes_per_step": r["bytes_per_step"], "roofline_fraction": r["roofline_fraction"]}
  return {"kv_heads": per_k, "bandwidth": result["bandwidth"], "config": result["config"]}


def _progress(text: str) -> None:
  print(PROGRESS_PREFIX + text, file=sys.stderr, flush=True)


class _ProgressWriter(io.TextIOBase):
  """A stdout stand-in that passes each complete line on as a progress line."""

  def __init__(self):
    super().__init__()
    self._partial = ""

  def write(self, text: str) -> int:
    *lines, self._partial = (self._partial + text).split("\n")
    for line in lines:
      if line.strip():
        _progress("  " + line.strip())
    return len(text)


def _measure_preset(request: Dict) -> Dict:
  config = T5Config(**request["config"])
  shape = {"batch": request["batch"], "input_length": request["input_length"],
           "output_length": request["output_length"]}
  _progress(f"K = {', '.join(map(str, request['kv_heads']))}: compiling and timing "
            f"(batch {shape['batch']}, input {shape['input_length']}, output "
            f"{shape['output_length']})")
  run = _benchmark(config, request["kv_heads"], repeats=request["repeats"],
                   bandwidth_gb=request["bandwidth_gb"], **shape)
  bandwidth = run["bandwidth"]
  return {"kv_heads": run["kv_heads"], "bandwidth_bytes_per_s": bandwidth["used_bytes_per_s"],
          "bandwidth_before": bandwidth["before_bytes_per_s"],
          "bandwidth_after": bandwidth["after_bytes_per_s"], "shape": {**run["config"], **shape},
          "repeats": request["repeats"], "dtype": jnp.dtype(config.dtype).name}


def _measure_paper(request: Dict) -> Dict:
  out: Dict = {"bandwidth_bytes_per_s": 0.0, "runs": {}}
  for spec in request["timings"]:
    timing = variants_lib.PaperTiming(**{**spec, "kv_heads": tuple(spec["kv_heads"])})
    start = time.perf_counter()
    shape = {"batch": timing.batch, "input_length": timing.input_length,
             "output_length": timing.output_length}
    _progress(f"T5.1.1-{timing.size} K = {', '.join(map(str, timing.kv_heads))}: initialising, "
              f"compiling and timing (batch {timing.batch}, input {timing.input_length}, output "
              f"{timing.output_length})")
    run = _benchmark(timing.config(), timing.kv_heads, repeats=timing.repeats,
                     bandwidth_gb=request["bandwidth_gb"], **shape)
    seconds = time.perf_counter() - start
    for figures in run["kv_heads"].values():
      figures["stage_seconds"] = seconds / len(run["kv_heads"])
    out["bandwidth_bytes_per_s"] = max(out["bandwidth_bytes_per_s"],
                                       run["bandwidth"]["used_bytes_per_s"])
    out["runs"][timing.size] = {"kv_heads": run["kv_heads"], "shape": {**run["config"], **shape},
                                "dtype": timing.dtype, "repeats": timing.repeats}
    gc.collect()  # one model in memory at a time
  return out


def main() -> None:
  """The child process: a JSON request on stdin, the measurements as one JSON line on stdout."""
  request = json.loads(sys.stdin.read())
  result = _measure_preset(request) if request["kind"] == "preset" else _measure_paper(request)
  print(json.dumps(result))


if __name__ == "__main__":
  main()
