"""`gqa-t5 convert`: turn a multi-head T5 checkpoint into a grouped-query (GQA/MQA) one.

  gqa-t5 convert --input PATH [--input-format auto|t5x|orbax|hf|mesh-tf] --output PATH
      [--output-format t5x|orbax] --num-kv-heads K [--num-cross-kv-heads K2]
      [--scan-layers | --no-scan-layers] [--optimizer-state adafactor|adafactor-momentum|none]
      [--method mean|first|random|aligned] [--seed S] [--compression gzip|zstd|none]
      [--calibration-data TSV --vocab SPM [--input-prefix P]] [--overwrite] [--allow-nonfinite]
      [--no-checksums] [--verbose]

Exit status: 0 done, 1 checkpoint error, 2 bad usage, 130/143 stopped by SIGINT/SIGTERM (the
partial output removed, the destination untouched).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import signal
import sys
import time
from typing import Iterator, List, Optional

from gqa_t5.checkpoints import run_layout
from gqa_t5.checkpoints.atomic import Interrupted, prepare_destination
from gqa_t5.checkpoints.errors import CheckpointError, describe_os_error
from gqa_t5.convert.converter import (OPTIMIZER_STATES, OUTPUT_FORMATS, CalibrationSpec,
                                      ConversionSpec, convert, output_parent)
from gqa_t5.convert.pooling import METHODS

INPUT_FORMATS = ("auto", "t5x", "orbax", "hf", "mesh-tf")
# t5x's checkpoint manager reads the step from the folder name of INITIAL_CHECKPOINT_PATH.
_T5X_DIR_NAME = re.compile(r"checkpoint_\d+")


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      prog="gqa-t5 convert",
      description="Convert a multi-head T5 checkpoint to grouped-query attention: only the "
                  "decoder's key/value kernels change (plus a function-preserving rotation of "
                  "its query/out kernels for --method aligned); everything else is copied "
                  "bit for bit.")
  parser.add_argument("--input", required=True,
                      help="source checkpoint (directory or prefix); a training run's MODEL_DIR "
                           "stands for its latest checkpoint, as in training and evaluation")
  parser.add_argument("--input-format", choices=INPUT_FORMATS, default="auto")
  parser.add_argument("--output", required=True,
                      help="destination checkpoint directory (missing parent folders are "
                           "created)")
  parser.add_argument("--output-format", choices=OUTPUT_FORMATS, default="t5x")
  parser.add_argument("--num-kv-heads", type=int, required=True,
                      help="key/value heads K of the decoder self-attention (1 = MQA)")
  parser.add_argument("--num-cross-kv-heads", type=int, default=None,
                      help="key/value heads of the encoder-decoder attention (default: K)")
  parser.add_argument("--method", choices=METHODS, default="mean")
  parser.add_argument("--scan-layers", action=argparse.BooleanOptionalAction, default=None,
                      help="write stacked 'layers' parameters (T5X's scan_layers layout) or, "
                           "with --no-scan-layers, unrolled 'layers_<i>' (default: the "
                           "input's layout, which is detected)")
  parser.add_argument("--optimizer-state", choices=OPTIMIZER_STATES, default="adafactor",
                      help="optimizer state of a t5x output, zeroed at the shapes t5x's "
                           "optimizer gives it so that t5x restores the checkpoint as "
                           "INITIAL_CHECKPOINT_PATH with no extra flags: 'adafactor' (T5.1.1's, "
                           "no momentum), 'adafactor-momentum' (beta1 set), 'none' (parameters "
                           "only)")
  parser.add_argument("--seed", type=int, default=0, help="seed of --method random")
  calibration = parser.add_argument_group(
      "calibration (--method aligned)",
      "align heads on their inputs over a few examples instead of on the weights; loads the "
      "whole model into memory once")
  calibration.add_argument("--calibration-data", default=None,
                           help="TSV file of 'input<TAB>target' lines")
  calibration.add_argument("--vocab", default=None, help="SentencePiece model of the data")
  calibration.add_argument("--input-prefix", default="", help='task prefix, e.g. "summarize: "')
  calibration.add_argument("--calibration-examples", type=int, default=64)
  calibration.add_argument("--input-length", type=int, default=512)
  calibration.add_argument("--target-length", type=int, default=128)
  parser.add_argument("--compression", choices=("gzip", "zstd", "none"), default="gzip",
                      help="zarr compression of --output-format t5x (gzip: as t5x writes; "
                           "zstd: several times faster, also read by t5x)")
  parser.add_argument("--overwrite", action="store_true", help="replace an existing output")
  parser.add_argument("--allow-nonfinite", action="store_true",
                      help="write tensors holding NaN/inf values (refused by default: the error "
                           "names the tensor and the count)")
  parser.add_argument("--no-checksums", action="store_true",
                      help="do not record a CRC-32 per tensor in gqa_provenance.json (what "
                           "`gqa-t5 verify` checks)")
  parser.add_argument("--quiet", action="store_true", help="print nothing but errors")
  parser.add_argument("--verbose", action="store_true",
                      help="show the traceback of an error (by default one line names it)")
  return parser


def _raise_interrupted(signum, frame):
  del frame
  raise Interrupted(signum)


@contextlib.contextmanager
def _sigterm_raises() -> Iterator[None]:
  """SIGTERM outside the write (reading, calibrating) stops like Ctrl-C: status 143, no trace."""
  previous = signal.signal(signal.SIGTERM, _raise_interrupted)
  try:
    yield
  finally:
    signal.signal(signal.SIGTERM, previous)


def main(argv: Optional[List[str]] = None) -> int:
  """Runs the conversion; returns 0 done, 1 checkpoint error, 2 bad usage, 128 + signal."""
  parser = build_parser()
  try:
    args = parser.parse_args(argv)
  except SystemExit as exit_:
    return int(exit_.code or 0)
  try:
    with _sigterm_raises():
      return _run(parser, args)
  except KeyboardInterrupt as error:  # Interrupted (SIGINT/SIGTERM) or a plain Ctrl-C
    code = getattr(error, "exit_code", 128 + signal.SIGINT)
    done = "was written completely first" if getattr(error, "completed", False) else \
        "was not written"
    print(f"gqa-t5 convert: stopped by {signal.Signals(code - 128).name}; {args.output} {done}",
          file=sys.stderr)
    return code


def resolve_input(path: str, quiet: bool = False) -> str:
  """A training run's MODEL_DIR stands for its latest checkpoint (MODEL_DIR/checkpoints/<step>),
  as INITIAL_CHECKPOINT_PATH and evaluation take it; the checkpoint taken is named on stderr.
  Any other path is returned as given."""
  try:
    latest = run_layout.latest_checkpoint_dir(path)
  except FileNotFoundError as error:
    raise CheckpointError(f"--input {path}: {error}") from None
  if latest is None:
    return path
  if not quiet:
    print(f"--input {path} is a training run's MODEL_DIR: converting its latest checkpoint "
          f"{latest} (step {os.path.basename(latest)})", file=sys.stderr)
  return latest


def _run(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
  spec = ConversionSpec(num_kv_heads=args.num_kv_heads,
                        num_cross_kv_heads=args.num_cross_kv_heads,
                        method=args.method, seed=args.seed)
  calibration = None
  if args.calibration_data:
    if not args.vocab:
      parser.print_usage(sys.stderr)
      print("gqa-t5 convert: error: --calibration-data needs --vocab", file=sys.stderr)
      return 2
    calibration = CalibrationSpec(args.calibration_data, args.vocab, args.input_prefix,
                                  args.input_length, args.target_length,
                                  args.calibration_examples)
  start = time.time()
  try:
    source = resolve_input(args.input, quiet=args.quiet)
    with output_parent(args.output):
      for stale in prepare_destination(args.output, args.overwrite):
        if not args.quiet:
          print(f"removed {stale}, left by an interrupted conversion", file=sys.stderr)
      record = convert(source, args.output, spec, input_format=args.input_format,
                       output_format=args.output_format, overwrite=args.overwrite,
                       compression=args.compression, calibration=calibration,
                       allow_nonfinite=args.allow_nonfinite, scan_layers=args.scan_layers,
                       optimizer_state=args.optimizer_state,
                       checksums=not args.no_checksums)
  except (CheckpointError, OSError) as error:  # OSError: an unwritable output, a full disk
    if args.verbose:
      raise
    message = describe_os_error(error) if isinstance(error, OSError) else str(error)
    print(f"gqa-t5 convert: error: {message}", file=sys.stderr)
    return 1
  if not args.quiet:
    print(f"converted {record['source']} ({record['source_format']}, step "
          f"{record['source_step']}) -> {args.output} ({args.output_format}): method "
          f"{spec.method}, K={spec.num_kv_heads}, K_cross={spec.cross_kv_heads}, "
          f"{'scanned' if record['scan_layers'] else 'unrolled'} layers, optimizer state "
          f"{record['optimizer_state']}, {len(record['changed_tensors'])} tensors changed, "
          f"{time.time() - start:.1f}s")
  name = os.path.basename(os.path.normpath(args.output))
  if args.output_format == "t5x" and not _T5X_DIR_NAME.fullmatch(name):
    print(f"gqa-t5 convert: note: t5x restores INITIAL_CHECKPOINT_PATH only from a folder "
          f"named checkpoint_<step> ('Found improperly formatted checkpoint directory' "
          f"otherwise): rename {name} to checkpoint_{record['source_step']}, or convert to "
          f".../checkpoint_{record['source_step']}", file=sys.stderr)
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
