"""Streaming benchmark of `gqa-t5 convert`: peak memory and throughput on a synthetic checkpoint.

Writes a random T5.1.1 checkpoint of a named size (gqa_t5/model/sizes.py) in T5X legacy format
(one tensor at a time), converts it in a child process (`python -m gqa_t5.convert`), and reports
the child's peak RSS against the target (3 x the largest tensor + 1 GiB), as a PASS/FAIL check,
and the conversion throughput. Beside it, the cost of the per-tensor checksums the converter
records (`gqa-t5 verify`): the CRC-32 throughput on the source's tensors, timed in this run
(tensors read first, only the checksum timed), and the share of the conversion time it makes.

  gqa-t5 benchmark-convert --size large --workdir /tmp/gqa_bench
  gqa-t5 benchmark-convert --size small --num-kv-heads 1 --output-format orbax
  gqa-t5 benchmark-convert --smoke --json out.json      (tiny, seconds)
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import time
from typing import Any, Dict

import numpy as np

import gqa_t5
from gqa_t5.benchmarks import common
from gqa_t5.checkpoints import checksums, detect, synthetic
from gqa_t5.checkpoints import tree as tree_lib
from gqa_t5.checkpoints.msgpack_codec import dtype_from_name
from gqa_t5.model import sizes

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
# The checksum throughput is timed on at most this much tensor data (XXL's 44 GiB would take
# minutes to read again; the rate is per byte).
CHECKSUM_SAMPLE_BYTES = GIB
# The directory holding the gqa_t5 package: the child imports this very copy.
_PACKAGE_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(gqa_t5.__file__)))


def _dir_bytes(path: str) -> int:
  total = 0
  for root, _, files in os.walk(path):
    total += sum(os.path.getsize(os.path.join(root, f)) for f in files)
  return total


def parse_args(argv):
  parser = argparse.ArgumentParser(prog="gqa-t5 benchmark-convert", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--size", choices=sizes.NAMES, default="large")
  parser.add_argument("--smoke", action="store_true", help="size tiny, zstd: seconds")
  parser.add_argument("--json", default=None, help="also write figures and checks to this file")
  parser.add_argument("--num-layers", type=common.positive_int, default=None,
                      help="override encoder and decoder depth (smaller runs)")
  parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
  parser.add_argument("--num-kv-heads", type=common.positive_int, default=None, help="default: N/4")
  parser.add_argument("--method", default="mean")
  parser.add_argument("--output-format", choices=("t5x", "orbax"), default="t5x")
  parser.add_argument("--compression", choices=("gzip", "zstd", "none"), default="gzip",
                      help="zarr compression of the converted t5x checkpoint")
  parser.add_argument("--source-compression", choices=("gzip", "zstd", "none"), default="zstd",
                      help="zarr compression of the synthetic source (zstd: quicker to write)")
  parser.add_argument("--no-checksums", action="store_true",
                      help="convert without recording per-tensor checksums (to measure "
                           "their cost against a run with them)")
  parser.add_argument("--workdir", default="/tmp/gqa_convert_benchmark")
  parser.add_argument("--keep", action="store_true", help="keep the checkpoints afterwards")
  args = parser.parse_args(argv)
  if args.smoke:
    args.size, args.compression = "tiny", "zstd"
  return args


def _facts(args) -> Dict[str, Any]:
  overrides = {"dropout_rate": 0.0, "dtype": "float32"}
  if args.num_layers:
    overrides.update(num_encoder_layers=args.num_layers, num_decoder_layers=args.num_layers)
  config = sizes.t5_1_1(args.size, **overrides)
  itemsize = dtype_from_name(args.dtype).itemsize
  shapes = tree_lib.expected_shapes(config)
  largest_name = max(shapes, key=lambda n: int(np.prod(shapes[n])))
  return {"config": config, "kv": args.num_kv_heads or max(1, config.num_heads // 4),
          "params": sum(int(np.prod(s)) for s in shapes.values()), "itemsize": itemsize,
          "largest_name": largest_name, "largest_shape": shapes[largest_name],
          "largest_bytes": int(np.prod(shapes[largest_name])) * itemsize}


def _write_source(args, facts, source: str) -> None:
  if os.path.exists(source):
    return
  common.progress(f"writing the synthetic source {source} ...")
  start = time.time()
  synthetic.write_t5x(source, facts["config"], dtype=dtype_from_name(args.dtype),
                      compression=args.source_compression)
  common.progress(f"wrote it in {time.time() - start:.0f}s")


def _convert(args, facts, source: str, output: str):
  command = [sys.executable, "-c", _CHILD, "--input", source, "--output", output,
             "--num-kv-heads", str(facts["kv"]), "--method", args.method,
             "--output-format", args.output_format, "--compression", args.compression,
             "--quiet"] + (["--no-checksums"] if args.no_checksums else [])
  env = dict(os.environ)
  env["PYTHONPATH"] = os.pathsep.join(p for p in (_PACKAGE_ROOT, env.get("PYTHONPATH")) if p)
  common.progress(f"converting to GQA-{facts['kv']} ({args.method}, {args.output_format}) ...")
  start = time.time()
  result = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
  return result, time.time() - start


def checksum_rate(source: str, sample_bytes: int = CHECKSUM_SAMPLE_BYTES) -> Dict[str, float]:
  """CRC-32 throughput of the converter's checksums on `source`'s tensors: each tensor read
  first (untimed), then only its checksum timed, until `sample_bytes` have been summed.
  {'bytes': summed, 'seconds': timed, 'mib_per_s': rate}."""
  summed, seconds = 0, 0.0
  tensors = detect.open_checkpoint(source, validate=False).tensors
  # Largest first: the sample covers the tensors that dominate a checkpoint's bytes.
  for name in sorted(tensors, key=lambda n: -int(np.prod(tensors[n].shape))):
    value = np.asarray(tensors[name].read())
    start = time.perf_counter()
    checksums.tensor_checksum(value)
    seconds += time.perf_counter() - start
    summed += value.nbytes
    if summed >= sample_bytes:
      break
  if summed == 0 or seconds <= 0:
    raise ValueError(f"no tensor data to time checksums on in {source}")
  return {"bytes": summed, "seconds": seconds, "mib_per_s": summed / MIB / seconds}


def main(argv=None) -> int:
  args = parse_args(argv)
  facts = _facts(args)
  data = facts["params"] * facts["itemsize"]
  os.makedirs(args.workdir, exist_ok=True)
  name = f"t511_{args.size}" + (f"_{args.num_layers}layers" if args.num_layers else "")
  source = os.path.join(args.workdir, f"{name}_{args.dtype}_{args.source_compression}")
  output = os.path.join(args.workdir, f"{name}_{args.dtype}_gqa{facts['kv']}_{args.output_format}")
  shutil.rmtree(output, ignore_errors=True)
  print(f"model: T5.1.1-{args.size} ({facts['params'] / 1e6:.0f}M parameters, {args.dtype}); "
        f"largest tensor {facts['largest_name']} {facts['largest_shape']} = "
        f"{facts['largest_bytes'] / MIB:.0f} MiB", flush=True)
  _write_source(args, facts, source)
  on_disk = _dir_bytes(source)
  print(f"source on disk: {on_disk / GIB:.2f} GiB ({data / GIB:.2f} GiB of tensor data)",
        flush=True)
  result, elapsed = _convert(args, facts, source, output)
  if result.returncode:
    print(f"conversion failed with exit status {result.returncode}:\n{result.stderr}")
    return result.returncode
  match = re.search(r"^PEAK_RSS_KIB=(\d+)$", result.stderr, re.MULTILINE)
  peak = int(match.group(1)) * 1024  # the converter's own peak (Linux reports KiB)
  target = 3 * facts["largest_bytes"] + GIB
  written = f"t5x, {args.compression}" if args.output_format == "t5x" else "orbax"
  written += ", no checksums" if args.no_checksums else ", checksums"
  print(f"converted to {output} ({written}, K={facts['kv']}, {args.method}) in {elapsed:.1f}s "
        f"(process start included): {data / MIB / elapsed:.0f} MiB/s of tensor data")
  print(f"peak RSS of the converter: {peak / GIB:.2f} GiB; target 3 x largest + 1 GiB = "
        f"{target / GIB:.2f} GiB: {'OK' if peak <= target else 'OVER'}")
  crc = checksum_rate(source)
  # The converter sums every byte it writes once: its cost is the data over the CRC rate.
  checksum_seconds = data / MIB / crc["mib_per_s"]
  print(f"checksums (CRC-32 per tensor): {crc['mib_per_s']:.0f} MiB/s on "
        f"{crc['bytes'] / MIB:.0f} MiB of the source's tensors, timed here beside the "
        f"conversion's {data / MIB / elapsed:.0f} MiB/s: {checksum_seconds:.2f}s = "
        f"{100 * checksum_seconds / elapsed:.1f}% of the conversion time"
        + (" (not recorded in this run: --no-checksums)" if args.no_checksums else ""))
  checks = [common.check("converter peak RSS <= 3 x largest tensor + 1 GiB", peak <= target,
                         f"{peak / GIB:.2f} GiB of {target / GIB:.2f} GiB")]
  common.print_checks(checks)
  common.write_json(args.json, {
      "benchmark": "convert", "smoke": bool(args.smoke), "size": args.size,
      "params": facts["params"], "dtype": args.dtype, "kv_heads": facts["kv"],
      "output_format": args.output_format, "checksums": not args.no_checksums,
      "seconds": elapsed,
      "mib_per_s": data / MIB / elapsed, "peak_rss_bytes": peak, "target_bytes": target,
      "source_bytes_on_disk": on_disk, "checksum_mib_per_s": crc["mib_per_s"],
      "checksum_seconds": checksum_seconds, "checksum_share": checksum_seconds / elapsed,
      "checks": checks})
  if not args.keep:
    shutil.rmtree(output, ignore_errors=True)
    shutil.rmtree(source, ignore_errors=True)
  return 0 if peak <= target else 3


if __name__ == "__main__":
  sys.exit(main())
