"""Stage 5: decode time per sample and per step for every key/value head count, with the decode
benchmark's method (`gqa_t5.benchmarks.decode`): fixed-length greedy decoding (no early stop),
compiled encode and decode loop timed apart, runs of different K interleaved so drift hits all
alike, best of several repeats, and this machine's memory bandwidth measured in the same run.

Time does not depend on the weights' values, so each K is timed once on randomly initialised
weights of the preset's shape; every fine-tuned variant with that K shares its time.
"""

from __future__ import annotations

import dataclasses
import json
import statistics
import subprocess
import sys
from typing import Dict, Sequence

from gqa_t5.reproduce import presets as presets_lib


def measure(dims: presets_lib.ModelDims, vocab_size: int, kv_heads: Sequence[int], *,
            batch: int, input_length: int, output_length: int, repeats: int,
            bandwidth_gb: float = 0.25) -> Dict:
  """{'kv_heads': {K: {...}}, 'bandwidth_bytes_per_s': ...} for each K in `kv_heads`.

  Runs in a fresh Python process: after training and evaluation this one holds tf.data worker
  threads and a fragmented heap, which made one K's steps twice as slow as in a clean process.
  """
  request = {"dims": dataclasses.asdict(dims), "vocab_size": vocab_size,
             "kv_heads": list(kv_heads), "batch": batch, "input_length": input_length,
             "output_length": output_length, "repeats": repeats, "bandwidth_gb": bandwidth_gb}
  done = subprocess.run([sys.executable, "-m", __name__], input=json.dumps(request),
                        capture_output=True, text=True, check=False)
  if done.returncode != 0:
    raise RuntimeError(f"the decode-timing process failed (exit {done.returncode}):\n"
                       f"{done.stderr[-4000:]}")
  return json.loads(done.stdout.strip().splitlines()[-1])


def _measure_here(dims: presets_lib.ModelDims, vocab_size: int, kv_heads: Sequence[int], *,
                  batch: int, input_length: int, output_length: int, repeats: int,
                  bandwidth_gb: float) -> Dict:
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from gqa_t5.benchmarks import decode  # pylint: disable=g-import-not-at-top
  shape = dict(emb_dim=dims.emb_dim, num_heads=dims.num_heads, head_dim=dims.head_dim,
               mlp_dim=dims.mlp_dim, layers=dims.num_layers, vocab=vocab_size,
               input_length=input_length, output_length=output_length, batch=batch)
  variants = [decode.Variant(shape, k, jnp.float32) for k in kv_heads]
  before = decode.measure_bandwidth(bandwidth_gb)
  for _ in range(repeats):
    for variant in variants:
      variant.run_once()
  after = decode.measure_bandwidth(bandwidth_gb)
  bandwidth = max(before, after)
  out = {}
  for v in variants:
    loop_min, encode_min = min(v.loop_times), min(v.encode_times)
    step_min = loop_min / output_length
    out[str(v.num_kv_heads)] = {
        "kv_heads": v.num_kv_heads,
        "time_per_sample": (encode_min + loop_min) / batch,
        "decode_time_per_sample": loop_min / batch,
        "encode_time_per_sample": encode_min / batch,
        "time_per_step": step_min,
        "time_per_step_median": statistics.median(v.loop_times) / output_length,
        "bytes_per_step": v.bytes,
        "roofline_fraction": v.bytes["total"] / step_min / bandwidth,
    }
  return {"kv_heads": out, "bandwidth_bytes_per_s": bandwidth,
          "bandwidth_before": before, "bandwidth_after": after,
          "shape": shape, "repeats": repeats, "dtype": "float32"}


def main() -> None:
  """The child process: a JSON request on stdin, the measurements as one JSON line on stdout."""
  request = json.loads(sys.stdin.read())
  dims = presets_lib.ModelDims(**request.pop("dims"))
  result = _measure_here(dims, request.pop("vocab_size"), request.pop("kv_heads"), **request)
  print(json.dumps(result))


if __name__ == "__main__":
  main()
