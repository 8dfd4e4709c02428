"""The `gqa-t5` command: one subcommand per job, each owned by the module that does it.

Modules are imported only when their subcommand runs, so `gqa-t5 convert` never loads
TensorFlow and `gqa-t5 --help` is instant.
"""

from __future__ import annotations

import importlib
import os
import sys
from typing import Dict, List, Optional, Tuple

from gqa_t5 import command_errors
from gqa_t5 import jax_setup
from gqa_t5 import tpu_topology

# subcommand: (module, function, one-line help)
SUBCOMMANDS: Dict[str, Tuple[str, str, str]] = {
    "convert": ("gqa_t5.convert.cli", "main",
                "convert an MHA checkpoint to GQA/MQA (mean, first, random, aligned)"),
    "verify": ("gqa_t5.convert.verify", "main",
               "check a converted checkpoint's tensors against their recorded checksums"),
    "prepare-demo-data": ("gqa_t5.demo_data.prepare", "main",
                          "fetch and build the offline demo suite of real text"),
    "train": ("gqa_t5.train", "main", "train (pretrain, uptrain, fine-tune) from gin files"),
    "eval": ("gqa_t5.eval", "main", "evaluate a checkpoint from gin files"),
    "infer": ("gqa_t5.infer", "main", "decode a task's inputs from gin files"),
    "reproduce": ("gqa_t5.reproduce", "main",
                  "reproduce the paper's Table 1 and Figures 3-6 (--preset quick|mini|gpu|paper)"),
    "compile": ("gqa_t5.reproduce.paper_scale.compile", "main",
                "compile the paper's jobs for their TPU v4 slices (libtpu) and check they fit"),
    "benchmark-decode": ("gqa_t5.benchmarks.decode", "main",
                         "decode speed per K against the memory roofline (and HF generate)"),
    "benchmark-train": ("gqa_t5.benchmarks.train", "main",
                        "train-step speed and MFU for MHA, GQA and MQA (and HF transformers)"),
    "benchmark-convert": ("gqa_t5.benchmarks.convert", "main",
                          "conversion peak memory and throughput on a synthetic checkpoint"),
}


def _usage() -> str:
  width = max(len(name) for name in SUBCOMMANDS)
  lines = ["usage: gqa-t5 [--verbose] <command> [args]", "", "commands:"]
  lines += [f"  {name:<{width}}  {help_}" for name, (_, _, help_) in SUBCOMMANDS.items()]
  lines += ["", "Run `gqa-t5 <command> --help` for a command's arguments. An expected failure "
            "(files, disks, permissions, configuration) is one line naming the path or "
            "setting; --verbose before the command shows its traceback."]
  return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  if not argv or argv[0] in ("-h", "--help", "help"):
    print(_usage())
    return 0
  verbose = argv[0] == "--verbose"
  if verbose:
    argv = argv[1:]
    if not argv:
      print(_usage())
      return 0
  name, rest = argv[0], argv[1:]
  if name not in SUBCOMMANDS:
    print(f"gqa-t5: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
    return 2
  module_name, function, _ = SUBCOMMANDS[name]
  if name == "convert":
    # Threaded OpenBLAS makes the many small SVDs of the `aligned` method ~4x slower on few cores.
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
  # Before any module loads TensorFlow or JAX's backends: TF's C++ start-up lines (its CUDA
  # probing on a machine without a GPU) and libtpu's complaints where it is installed only to
  # compile are noise for every subcommand.
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  tpu_topology.hide_absent_tpu()
  try:
    with jax_setup.filtered_stderr(jax_setup.TF_NOISE):
      module = importlib.import_module(module_name)
  except ModuleNotFoundError as error:
    if error.name and module_name.startswith(error.name):
      print(f"gqa-t5 {name}: this installation has no {module_name}", file=sys.stderr)
      return 2
    raise
  prog = f"gqa-t5 {name}"
  try:
    return int(getattr(module, function)(rest) or 0)
  except command_errors.EXPECTED_ERRORS as error:
    # A command's own handling reports what it expects; this is the net under every command.
    if verbose:
      raise
    log = command_errors.log_traceback(prog, error)
    command_errors.report(prog, error, note=f" (traceback in {log})" if log else "")
    return 2


if __name__ == "__main__":
  raise SystemExit(main())
