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
import os
import subprocess
import sys
import tempfile
from typing import Dict, Sequence

from gqa_t5.benchmarks import decode
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
  # The decode benchmark itself, on the preset's dimensions (it prints its table to stdout first).
  with tempfile.TemporaryDirectory() as scratch:
    path = os.path.join(scratch, "decode.json")
    decode.main(["--size", "tiny", "--emb-dim", str(dims.emb_dim), "--num-heads",
                 str(dims.num_heads), "--head-dim", str(dims.head_dim), "--mlp-dim",
                 str(dims.mlp_dim), "--layers", str(dims.num_layers), "--vocab", str(vocab_size),
                 "--batch", str(batch), "--input-length", str(input_length), "--output-length",
                 str(output_length), "--dtype", "float32", "--repeats", str(repeats),
                 "--kv-heads", ",".join(str(k) for k in kv_heads), "--jax-cache-dir", "",
                 "--bandwidth-mib", str(int(bandwidth_gb * 1024)), "--json", path])
    with open(path) as f:
      result = json.load(f)
  out = {}
  encode_per_sample = result["encode_s"] / batch
  for r in result["per_k"]:
    step = r["step_ms_min"] / 1e3
    out[str(r["kv_heads"])] = {
        "kv_heads": r["kv_heads"],
        "time_per_sample": encode_per_sample + step * output_length / batch,
        "decode_time_per_sample": step * output_length / batch,
        "encode_time_per_sample": encode_per_sample,
        "time_per_step": step,
        "time_per_step_median": r["step_ms_median"] / 1e3,
        "bytes_per_step": r["bytes_per_step"],
        "roofline_fraction": r["roofline_fraction"],
    }
  bandwidth = result["bandwidth"]
  return {"kv_heads": out, "bandwidth_bytes_per_s": bandwidth["used_bytes_per_s"],
          "bandwidth_before": bandwidth["before_bytes_per_s"],
          "bandwidth_after": bandwidth["after_bytes_per_s"],
          "shape": dict(result["config"], batch=batch, input_length=input_length,
                        output_length=output_length), "repeats": repeats, "dtype": "float32"}


def main() -> None:
  """The child process: a JSON request on stdin, the measurements as one JSON line on stdout."""
  request = json.loads(sys.stdin.read())
  dims = presets_lib.ModelDims(**request.pop("dims"))
  result = _measure_here(dims, request.pop("vocab_size"), request.pop("kv_heads"), **request)
  print(json.dumps(result))


if __name__ == "__main__":
  main()
