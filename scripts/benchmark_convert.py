"""Streaming benchmark of `gqa-t5 convert`: peak memory and throughput on a synthetic checkpoint.

Writes a random T5.1.1 checkpoint of the given size in T5X legacy format (one tensor at a time),
converts it in a child process (`python -m gqa_t5.convert`), and prints the child's peak RSS
against the target (3 x the largest tensor + 1 GiB) and the conversion throughput.

  python scripts/benchmark_convert.py --size large --workdir /tmp/gqa_bench
  python scripts/benchmark_convert.py --size small --num-kv-heads 1 --output-format orbax
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import time

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, _REPO)

from gqa_t5.checkpoints import synthetic  # noqa: E402
from gqa_t5.checkpoints import tree as tree_lib  # noqa: E402

# The converter as `python -m gqa_t5.convert` runs it, reporting its own peak RSS at exit:
# VmHWM of its address space (ru_maxrss would include the parent's RSS from before exec).
_CHILD = (
    "import os, resource, runpy, sys\n"
    "sys.argv = ['gqa_t5.convert'] + sys.argv[1:]\n"
    "try:\n"
    "  runpy.run_module('gqa_t5.convert', run_name='__main__')\n"
    "finally:\n"
    "  peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
    "  if os.path.exists('/proc/self/status'):\n"
    "    for line in open('/proc/self/status'):\n"
    "      if line.startswith('VmHWM:'):\n"
    "        peak = int(line.split()[1])\n"
    "  print(f'PEAK_RSS_KIB={peak}', file=sys.stderr)\n")
GIB = 1024 ** 3
MIB = 1024 ** 2


def _dir_bytes(path: str) -> int:
  total = 0
  for root, _, files in os.walk(path):
    total += sum(os.path.getsize(os.path.join(root, f)) for f in files)
  return total


def parse_args(argv):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--size", choices=sorted(synthetic.T511_SIZES), default="large")
  parser.add_argument("--num-layers", type=int, default=None,
                      help="override encoder and decoder depth (smaller runs)")
  parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
  parser.add_argument("--num-kv-heads", type=int, default=None, help="default: N/4")
  parser.add_argument("--method", default="mean")
  parser.add_argument("--output-format", choices=("t5x", "orbax"), default="t5x")
  parser.add_argument("--compression", choices=("gzip", "zstd", "none"), default="gzip",
                      help="zarr compression of the converted t5x checkpoint")
  parser.add_argument("--source-compression", choices=("gzip", "zstd", "none"), default="zstd",
                      help="zarr compression of the synthetic source (zstd: quicker to write)")
  parser.add_argument("--workdir", default="/tmp/gqa_convert_benchmark")
  parser.add_argument("--keep", action="store_true", help="keep the checkpoints afterwards")
  return parser.parse_args(argv)


def main(argv=None) -> int:
  args = parse_args(argv)
  overrides = {}
  if args.num_layers:
    overrides = dict(num_encoder_layers=args.num_layers, num_decoder_layers=args.num_layers)
  config = synthetic.t511_config(args.size, **overrides)
  kv = args.num_kv_heads or max(1, config.num_heads // 4)
  dtype = "bfloat16" if args.dtype == "bfloat16" else "float32"
  import numpy as np
  from gqa_t5.checkpoints.msgpack_codec import dtype_from_name
  itemsize = dtype_from_name(dtype).itemsize
  shapes = tree_lib.expected_shapes(config)
  params = sum(int(np.prod(s)) for s in shapes.values())
  largest_name = max(shapes, key=lambda n: int(np.prod(shapes[n])))
  largest = int(np.prod(shapes[largest_name])) * itemsize

  os.makedirs(args.workdir, exist_ok=True)
  name = f"t511_{args.size}" + (f"_{args.num_layers}layers" if args.num_layers else "")
  source = os.path.join(args.workdir, f"{name}_{dtype}_{args.source_compression}")
  output = os.path.join(args.workdir, f"{name}_{dtype}_gqa{kv}_{args.output_format}")
  shutil.rmtree(output, ignore_errors=True)
  print(f"model: T5.1.1-{args.size} ({params / 1e6:.0f}M parameters, {dtype}); largest tensor "
        f"{largest_name} {shapes[largest_name]} = {largest / MIB:.0f} MiB", flush=True)
  if not os.path.exists(source):
    start = time.time()
    synthetic.write_t5x(source, config, dtype=dtype_from_name(dtype),
                        compression=args.source_compression)
    print(f"wrote synthetic source {source} in {time.time() - start:.0f}s", flush=True)
  on_disk = _dir_bytes(source)
  print(f"source on disk: {on_disk / GIB:.2f} GiB ({params * itemsize / GIB:.2f} GiB of "
        "tensor data)", flush=True)

  command = [sys.executable, "-c", _CHILD, "--input", source, "--output", output,
             "--num-kv-heads", str(kv), "--method", args.method,
             "--output-format", args.output_format, "--compression", args.compression,
             "--quiet"]
  start = time.time()
  result = subprocess.run(command, cwd=_REPO, capture_output=True, text=True)
  elapsed = time.time() - start
  if result.returncode:
    print(f"conversion failed with exit status {result.returncode}:\n{result.stderr}")
    return result.returncode
  match = re.search(r"^PEAK_RSS_KIB=(\d+)$", result.stderr, re.MULTILINE)
  peak = int(match.group(1)) * 1024  # the converter's own peak (Linux reports KiB)
  target = 3 * largest + GIB
  data = params * itemsize
  written = (f"t5x, {args.compression}" if args.output_format == "t5x" else "orbax")
  print(f"converted to {output} ({written}, K={kv}, {args.method}) in "
        f"{elapsed:.1f}s (process start included): {data / MIB / elapsed:.0f} MiB/s of "
        "tensor data")
  print(f"peak RSS of the converter: {peak / GIB:.2f} GiB; target 3 x largest + 1 GiB = "
        f"{target / GIB:.2f} GiB: {'OK' if peak <= target else 'OVER'}")
  if not args.keep:
    shutil.rmtree(output, ignore_errors=True)
    shutil.rmtree(source, ignore_errors=True)
  return 0 if peak <= target else 3


if __name__ == "__main__":
  sys.exit(main())
