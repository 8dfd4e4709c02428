"""`gqa-t5 reproduce --preset paper --dry-run`: the paper's runs at full scale, checked here.

For T5.1.1-Large and -XXL with MHA, MQA and GQA-8 it builds every job the paper ran
(`jobs.build_jobs`: uptraining from the public T5X checkpoint at alpha = 0.05, fine-tuning on the
seven TFDS/seqio tasks with the paper's settings, greedy evaluation on the validation split),
checks each one without weights or data (`checks.check_job`), prints what it verified, then the
commands to launch on the pod; `out` also gets them as paper_commands.sh and paper_dry_run.json.
"""

from __future__ import annotations

import json
import os
import time
from typing import Callable, List, Optional

from gqa_t5 import tasks as _tasks  # pylint: disable=unused-import  # registers the tasks
from gqa_t5.checkpoints import atomic
from gqa_t5.reproduce.paper_scale import checks
from gqa_t5.reproduce.paper_scale import jobs as jobs_lib


def _check_all(jobs: List[jobs_lib.Job], log: Callable[[str], None]) -> List:
  abstract = checks.AbstractParams()
  failures = []
  current, shown = None, set()
  for job in jobs:
    if job.model != current:
      current, shown = job.model, set()
      log(jobs_lib.header(job.model)[2:])
    try:
      checks.check_job(job, abstract)
      if job.kind != "eval" and not any(c.startswith("decode cache") for j in jobs
                                        if j.model == job.model for c in j.checks):
        model = checks.configured_model(job)
        job.checks.append(checks.check_decode_cache(model, model.module.config))
      log(f"  OK   {job.name}: {job.checks[0][5:]}")
      for line in job.checks[1:]:
        if line not in shown:  # each model's shared checks once
          shown.add(line)
          log(f"         {line}")
    except (checks.DryRunError, ValueError, KeyError) as error:
      failures.append((job, str(error)))
      log(f"  FAIL {job.name}: {error}")
  return failures


def dry_run(out: Optional[str] = None, log: Callable[[str], None] = print,
            jobs: Optional[List[jobs_lib.Job]] = None) -> int:
  """Checks every paper-scale job; prints the results and the commands. Returns 0 or 2."""
  start = time.perf_counter()
  jobs = jobs_lib.build_jobs() if jobs is None else jobs
  log(f"checking {len(jobs)} paper-scale jobs abstractly (about a minute for all of them)")
  failures = _check_all(jobs, log)
  log("")
  text = jobs_lib.commands_text(jobs)
  log(text)
  summary = {"jobs": [{"name": j.name, "kind": j.kind, "task": j.task,
                       "gin_files": list(j.gin_files), "bindings": j.bindings,
                       "checks": j.checks, "bytes_per_chip": j.bytes_per_chip,
                       "command": j.command()} for j in jobs],
             "failures": [{"job": j.name, "error": e} for j, e in failures],
             "seconds": time.perf_counter() - start}
  if out:
    os.makedirs(out, exist_ok=True)
    for name, content in (("paper_commands.sh", text),
                          ("paper_dry_run.json", json.dumps(summary, indent=2))):
      atomic.write_text(os.path.join(out, name), content)
      log(f"wrote {os.path.join(out, name)}")
  log(f"{len(jobs) - len(failures)} of {len(jobs)} paper-scale jobs check out "
      f"({summary['seconds']:.0f} s; no weights, data or TPU were used)")
  return 2 if failures else 0
