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

import gc
import json
import os
import statistics
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


def _shape(config: T5Config, batch: int, input_length: int, output_length: int) -> Dict:
  return dict(emb_dim=config.emb_dim, num_heads=config.num_heads, head_dim=config.head_dim,
              mlp_dim=config.mlp_dim, layers=config.num_encoder_layers,
              vocab=config.vocab_size, input_length=input_length,
              output_length=output_length, batch=batch)


def _summary(v: decode.Variant, shape: Dict, bandwidth: float) -> Dict:
  loop_min, encode_min = min(v.loop_times), min(v.encode_times)
  t, b = shape["output_length"], shape["batch"]
  step_min = loop_min / t
  return {"kv_heads": v.num_kv_heads, "time_per_sample": (encode_min + loop_min) / b,
          "decode_time_per_sample": loop_min / b, "encode_time_per_sample": encode_min / b,
          "time_per_step": step_min,
          "time_per_step_median": statistics.median(v.loop_times) / t,
          "bytes_per_step": v.bytes, "roofline_fraction": v.bytes["total"] / step_min / bandwidth}


def _progress(text: str) -> None:
  print(PROGRESS_PREFIX + text, file=sys.stderr, flush=True)


def _measure_preset(request: Dict) -> Dict:
  config = T5Config(**request["config"])
  shape = _shape(config, request["batch"], request["input_length"], request["output_length"])
  dtype = jnp.dtype(config.dtype)
  variants = []
  for k in request["kv_heads"]:
    _progress(f"K={k}: compiling encode and decode loop")
    variants.append(decode.Variant(shape, k, dtype))
  before = decode.measure_bandwidth(request["bandwidth_gb"])
  for i in range(request["repeats"]):
    ks = ", ".join(map(str, request["kv_heads"]))
    _progress(f"timed run {i + 1}/{request['repeats']}: K = {ks}")
    for variant in variants:
      variant.run_once()
  after = decode.measure_bandwidth(request["bandwidth_gb"])
  bandwidth = max(before, after)
  return {"kv_heads": {str(v.num_kv_heads): _summary(v, shape, bandwidth) for v in variants},
          "bandwidth_bytes_per_s": bandwidth, "bandwidth_before": before,
          "bandwidth_after": after, "shape": shape, "repeats": request["repeats"],
          "dtype": dtype.name}


def _measure_paper(request: Dict) -> Dict:
  bandwidth = decode.measure_bandwidth(request["bandwidth_gb"])
  out: Dict = {"bandwidth_bytes_per_s": bandwidth, "runs": {}}
  for spec in request["timings"]:
    timing = variants_lib.PaperTiming(**{**spec, "kv_heads": tuple(spec["kv_heads"])})
    config = timing.config()
    shape = _shape(config, timing.batch, timing.input_length, timing.output_length)
    per_k = {}
    for k in timing.kv_heads:
      start = time.perf_counter()
      _progress(f"T5.1.1-{timing.size} K={k}: initialising and compiling (batch "
                f"{timing.batch}, input {timing.input_length}, output {timing.output_length})")
      variant = decode.Variant(shape, k, jnp.dtype(timing.dtype))
      for i in range(timing.repeats):
        _progress(f"T5.1.1-{timing.size} K={k}: timed run {i + 1}/{timing.repeats}")
        variant.run_once()
      per_k[str(k)] = _summary(variant, shape, bandwidth)
      per_k[str(k)]["stage_seconds"] = time.perf_counter() - start
      del variant
      gc.collect()  # one model in memory at a time
    out["runs"][timing.size] = {"kv_heads": per_k, "shape": shape, "dtype": timing.dtype,
                                "repeats": timing.repeats}
  return out


def main() -> None:
  """The child process: a JSON request on stdin, the measurements as one JSON line on stdout."""
  request = json.loads(sys.stdin.read())
  result = _measure_preset(request) if request["kind"] == "preset" else _measure_paper(request)
  print(json.dumps(result))


if __name__ == "__main__":
  main()
