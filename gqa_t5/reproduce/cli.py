"""`gqa-t5 reproduce`: the paper's Table 1 and Figures 3-6 in one command.

  gqa-t5 reproduce --preset quick            # every stage at small scale (<= 15 min, 2 cores)
  gqa-t5 reproduce --preset mini             # larger, with run-to-run noise (<= 60 min)
  gqa-t5 reproduce --preset paper --dry-run  # T5.1.1-Large/XXL: check every config, print
                                             # the commands to launch on a TPU pod
  gqa-t5 reproduce --redraw DIR              # rewrite table1.md, figures, REPORT.md from
                                             # DIR/results.json

Outputs go to --out (default results/<preset>): table1.md, fig3.png .. fig6.png, results.json,
REPORT.md. Intermediate stages live in OUT/work/ and are reused: a rerun skips finished stages
and a killed run resumes where it stopped.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import List, Optional


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
  from gqa_t5.reproduce import presets  # pylint: disable=g-import-not-at-top
  parser = argparse.ArgumentParser(
      prog="gqa-t5 reproduce", description=__doc__,
      formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--preset", default="quick",
                      choices=sorted(presets.PRESETS) + ["paper"],
                      help="scale: quick, mini, paper (with --dry-run); 'test' is for the tests")
  parser.add_argument("--out", default=None, help="output directory (default results/<preset>)")
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
  parser.add_argument("--no-progress", action="store_true", help="no training progress bars")
  args = parser.parse_args(argv)
  if args.preset == "paper" and not args.dry_run and not args.redraw:
    parser.error("--preset paper runs on a TPU pod, not here: use --preset paper --dry-run to "
                 "check its configurations and print the commands to launch")
  return args


def _default_out(preset: str) -> Path:
  return Path("results") / preset


def _list_stages(out: Path) -> int:
  from gqa_t5.reproduce import stages  # pylint: disable=g-import-not-at-top
  stage_dir = out / "work" / "stages"
  if not stage_dir.is_dir():
    print(f"{out}: nothing run yet")
    return 0
  for entry in sorted(stage_dir.iterdir()):
    if entry.name.endswith(".work"):
      print(f"  {entry.name[:-5]:<40} interrupted (resumes on the next run)")
    elif (entry / stages.STAGE_FILE).exists():
      print(f"  {entry.name:<40} done")
  return 0


def main(argv: Optional[List[str]] = None) -> int:
  args = parse_args(argv)
  if args.redraw:
    from gqa_t5.reproduce import outputs, report  # pylint: disable=g-import-not-at-top
    results = outputs.read_results(args.redraw)
    results["claims"] = report.evaluate_claims(results)  # this version's verdicts
    outputs.write_all(results, args.redraw)
    return 0
  if args.preset == "paper":
    from gqa_t5.reproduce import paper_scale  # pylint: disable=g-import-not-at-top
    return paper_scale.dry_run(out=args.out)
  out = Path(args.out) if args.out else _default_out(args.preset)
  if args.dry_run:
    return _list_stages(out)
  logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
  for noisy in ("absl", "jax", "orbax", "tensorflow", "etils"):
    logging.getLogger(noisy).setLevel(logging.ERROR)
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
  from gqa_t5.demo_data import layout  # pylint: disable=g-import-not-at-top
  from gqa_t5.reproduce import pipeline, presets  # pylint: disable=g-import-not-at-top
  data_dir = layout.data_dir(args.data_dir)
  if not layout.is_complete(data_dir):
    if args.no_prepare:
      layout.require_complete(data_dir)  # raises, saying what to run
    from gqa_t5.demo_data import prepare  # pylint: disable=g-import-not-at-top
    print(f"demo data missing in {data_dir}: preparing it first (gqa-t5 prepare-demo-data)")
    prepare.prepare(data_dir)
  options = pipeline.Options(preset=presets.get_preset(args.preset), out_dir=out,
                             data_dir=str(data_dir), initial_checkpoint=args.initial_checkpoint,
                             progress=not args.no_progress)
  try:
    results = pipeline.Pipeline(options).run()
  except (ValueError, FileNotFoundError) as error:
    print(f"gqa-t5 reproduce: error: {error}", file=sys.stderr)
    return 2
  print(f"\n{out}/REPORT.md:")
  for claim in results["claims"]:
    print(f"  ({claim['id']}) {claim['verdict']}: {claim['statement']}")
  print(f"{results['wall_seconds'] / 60:.1f} minutes")
  return 0
