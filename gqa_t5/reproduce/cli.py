"""`gqa-t5 reproduce`: the paper's Table 1 and Figures 3-6 in one command.

  gqa-t5 reproduce --preset quick            # every stage at small scale, on a CPU
  gqa-t5 reproduce --preset mini             # larger, with run-to-run noise, on a CPU
  gqa-t5 reproduce --preset gpu              # one H200: scores above the floor, and decode
                                             # timing at the paper's XXL / Large shapes
  gqa-t5 reproduce --preset gpu --smoke      # the same stages at seconds per stage (CI, CPU)
  gqa-t5 reproduce --preset paper --dry-run  # T5.1.1-Large/XXL: check every config, print
                                             # the commands to launch on a TPU pod
  gqa-t5 reproduce --redraw DIR              # rewrite table1.md, figures, REPORT.md from
                                             # DIR/results.json
  gqa-t5 reproduce --compare results/quick   # check the run in --out (default
                                             # ./gqa_t5_runs/quick) against reference results

Outputs go to --out (default ./gqa_t5_runs/<preset>): table1.md, fig3.png .. fig6.png,
results.json, REPORT.md. Intermediate stages live in OUT/work/ and are reused: a rerun skips
finished stages and a killed run resumes where it stopped. The repository's results/<preset>/
folders are committed reference results: a run never writes there unless --out says so.

An expected failure (an unwritable, read-only or full --out, a missing --initial-checkpoint, a
bad preset or setting, demo data that cannot be fetched) is one line naming the path or setting
and the cause, exit status 2; --verbose shows its traceback.
"""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path
from typing import List, Optional

from gqa_t5 import command_errors
from gqa_t5 import jax_setup
from gqa_t5.demo_data import extract
from gqa_t5.demo_data import fetch
from gqa_t5.demo_data import layout
from gqa_t5.demo_data import prepare
from gqa_t5.reproduce import compare
from gqa_t5.reproduce.pipeline import presets
from gqa_t5.reproduce.pipeline import run as run_lib
from gqa_t5.reproduce.pipeline import stage_cache
from gqa_t5.reproduce.report import claims
from gqa_t5.reproduce.report import results as results_lib

DEFAULT_OUT_ROOT = "gqa_t5_runs"  # under the working directory; never the reference results/
PROG = "gqa-t5 reproduce"
# Expected failures beyond configuration and files (command_errors.EXPECTED_ERRORS): a stage
# store that refuses a name or result, demo data that cannot be fetched or built.
_EXPECTED = command_errors.EXPECTED_ERRORS + (stage_cache.StageError, prepare.DemoDataError,
                                              fetch.ArchiveError, extract.ExtractionError)


def _times_epilog() -> str:
  lines = ["expected time per preset (one figure each, with the machine it is from):"]
  for name in presets.public_names():
    lines.append(f"  {name:<6} {presets.PRESETS[name].time_figure}")
  lines.append("  paper  --dry-run only: about a minute on a CPU")
  return "\n".join(lines)


def _preset_name(value: str) -> str:
  if value != "paper" and value not in presets.PRESETS:
    raise argparse.ArgumentTypeError(
        f"unknown preset {value!r}; choose from {', '.join(presets.public_names() + ['paper'])}")
  return value


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(
      prog=PROG, description=__doc__, epilog=_times_epilog(),
      formatter_class=argparse.RawDescriptionHelpFormatter)
  choices = ", ".join(presets.public_names() + ["paper"])
  parser.add_argument("--preset", default="quick", type=_preset_name, metavar="PRESET",
                      help=f"scale: {choices} ('paper' with --dry-run)")
  parser.add_argument("--smoke", action="store_true",
                      help="shrink the preset to seconds per stage (same stages; CI's test)")
  parser.add_argument("--out", default=None,
                      help=f"output directory (default ./{DEFAULT_OUT_ROOT}/<preset>)")
  parser.add_argument("--data-dir", default=None,
                      help="demo data directory (default $GQA_T5_DEMO_DATA or "
                           "~/.cache/gqa_t5/demo_data); prepared first when incomplete")
  parser.add_argument("--no-prepare", action="store_true",
                      help="fail instead of preparing missing demo data")
  parser.add_argument("--initial-checkpoint", default=None,
                      help="start from this multi-head checkpoint (any format the converter "
                           "reads) instead of pretraining; its vocabulary must be the demo "
                           "data's")
  parser.add_argument("--dry-run", action="store_true",
                      help="paper preset: check configurations abstractly and print the pod "
                           "commands; other presets: list the stages and which are done")
  parser.add_argument("--redraw", metavar="DIR", default=None,
                      help="only rewrite the outputs in DIR from its results.json")
  parser.add_argument("--compare", metavar="REFERENCE", default=None,
                      help="only compare the run in --out (default ./gqa_t5_runs/<preset>) "
                           "with REFERENCE (a results folder or results.json, e.g. "
                           "results/quick): computed numbers within tolerance, measured times "
                           "listed; exit status 1 when they differ")
  parser.add_argument("--no-progress", action="store_true", help="no training progress bars")
  parser.add_argument("--verbose", action="store_true",
                      help="show the traceback of an error (by default one line names it)")
  args = parser.parse_args(argv)
  if args.preset == "paper" and not args.dry_run and not args.redraw:
    parser.error("--preset paper runs on a TPU pod, not here: use --preset paper --dry-run to "
                 "check its configurations and print the commands to launch")
  return args


def default_out(preset: str, smoke: bool = False) -> Path:
  """./gqa_t5_runs/<preset>[-smoke]: a user's directory, outside the reference results/."""
  return Path(DEFAULT_OUT_ROOT) / (f"{preset}-smoke" if smoke else preset)


def _list_stages(out: Path) -> int:
  stage_dir = out / run_lib.WORK_DIR / "stages"
  if not stage_dir.is_dir():
    print(f"{out}: nothing run yet")
    return 0
  for entry in sorted(stage_dir.iterdir()):
    if entry.name.endswith(".work"):
      print(f"  {entry.name[:-5]:<40} interrupted (resumes on the next run)")
    elif (entry / stage_cache.STAGE_FILE).exists():
      print(f"  {entry.name:<40} done")
  return 0


def _quiet_logs() -> None:
  logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
  for noisy in ("absl", "jax", "orbax", "tensorflow", "etils"):
    logging.getLogger(noisy).setLevel(logging.ERROR)
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
  jax_setup.quiet_logs()  # TensorFlow loaded with its CUDA probing filtered, as the entry points
  # On a GPU the timing stages run in a child process beside this one: neither may take 75%
  # of the accelerator's memory up front (JAX's default) or the other could not start.
  os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")


def _prepare_data(args) -> Path:
  data_dir = layout.data_dir(args.data_dir)
  if not layout.is_complete(data_dir):
    if args.no_prepare:
      layout.require_complete(data_dir)  # raises, saying what to run
    print(f"demo data missing in {data_dir}: preparing it first (gqa-t5 prepare-demo-data; "
          f"36-51 s on a quiet 2-core CPU, download included)")
    prepare.prepare(data_dir)
  return data_dir


def _check_initial_checkpoint(path: Optional[str]) -> None:
  """Refused before the demo data is prepared or anything runs."""
  if path and not os.path.exists(path):
    raise ValueError(f"--initial-checkpoint {path} does not exist")


def _make_out(out: Path) -> None:
  """--out created and writable before the demo data is prepared or anything runs (an OSError
  names the path: under a file, no permission, a read-only file system)."""
  out.mkdir(parents=True, exist_ok=True)
  if not os.access(out, os.W_OK | os.X_OK):
    raise PermissionError(13, "not writable (--out)", str(out))


def main(argv: Optional[List[str]] = None) -> int:
  args = parse_args(argv)
  return command_errors.run_reporting_errors(PROG, lambda: _run(args), verbose=args.verbose,
                                             expected=_EXPECTED)


def _run(args: argparse.Namespace) -> int:
  if args.redraw:
    results = results_lib.read_results(args.redraw)
    results.claims = claims.evaluate_claims(results)  # this version's verdicts
    results_lib.write_all(results, args.redraw)
    return 0
  if args.compare:
    run_dir = args.out or str(default_out(args.preset, args.smoke))
    comparison = compare.compare_files(run_dir, args.compare)
    print(f"{run_dir} against {args.compare}:")
    print("\n".join(comparison.lines()))
    return 1 if comparison.failures else 0
  if args.preset == "paper":
    _quiet_logs()  # before TensorFlow and libtpu load, as for every other preset
    # The dry run registers the paper's seqio tasks (TensorFlow): loaded only for this job.
    from gqa_t5.reproduce.paper_scale import dry_run  # pylint: disable=g-import-not-at-top
    return dry_run.dry_run(out=args.out)
  out = Path(args.out) if args.out else default_out(args.preset, args.smoke)
  if args.dry_run:
    return _list_stages(out)
  _check_initial_checkpoint(args.initial_checkpoint)
  _make_out(out)
  preset = presets.get_preset(args.preset, smoke_test=args.smoke)
  print(f"gqa-t5 reproduce --preset {preset.name}: {preset.time_figure}; outputs in {out}")
  _quiet_logs()
  data_dir = _prepare_data(args)
  options = run_lib.Options(preset=preset, out_dir=out, data_dir=str(data_dir),
                            initial_checkpoint=args.initial_checkpoint,
                            progress=not args.no_progress)
  results = run_lib.Pipeline(options).run()
  print(f"\n{out}/REPORT.md:")
  for claim in results.claims:
    print(f"  ({claim.id}) {claim.verdict} (tolerance: {claim.tolerance or '-'}): "
          f"{claim.statement}")
  print(f"{results.wall_seconds / 60:.1f} minutes")
  return 0
