"""Where a benchmark's device time goes: a profiler trace of a few calls, summed by operation.

`summarize(fn, calls, per)` traces `calls` calls of `fn` with `jax.profiler` and reads the trace
back (`jax.profiler.ProfileData`). On a GPU it counts the kernels on the device's streams (each a
launch); on a CPU, the XLA operations on the runtime's threads. Per unit of `per` (a decode step,
a train step) it reports:

  kernels  how many operations ran;
  busy_ms  the time at least one of them was running (the union of their intervals);
  span_ms  from the first one's start to the last one's end.

span - busy is time the device sat idle between operations: a step whose busy time is near its
bytes' or FLOPs' roofline but whose span is not is bound by launches or host work, not by the
device. `top` lists the operations that took the most time. A trace with no operations where
they were looked for is reported with the planes and lines it has, so the layout can be read.
"""

from __future__ import annotations

import glob
import os
import re
import tempfile
from typing import Any, Callable, Dict, List, Tuple

import jax
from jax.profiler import ProfileData

# Runtime bookkeeping on the CPU client's threads (not operations of the program), and the
# control-flow operations whose intervals contain the operations of their bodies.
_CPU_BOOKKEEPING = ("ThreadpoolListener", "Await", "end: ", "ThunkExecutor", "Record",
                    "ThreadPool", "PjRt", "Execute")
_CPU_CONTAINER = re.compile(r"^(while|conditional|call)(\.\d+)?$")


def _operations(data: ProfileData) -> Tuple[str, List[Tuple[str, int, int]]]:
  """(where they were found, [(name, start ns, duration ns)]) of the trace's operations."""
  devices = [p for p in data.planes if p.name.startswith("/device:GPU")]
  if devices:
    events = [(e.name, e.start_ns, e.duration_ns) for p in devices for line in p.lines
              if line.name.startswith("Stream") for e in line.events]
    return "GPU streams", events
  events = [(e.name, e.start_ns, e.duration_ns) for p in data.planes if p.name == "/host:CPU"
            for line in p.lines if line.name.startswith("tf_XLA") for e in line.events
            if e.duration_ns > 0 and not _CPU_CONTAINER.match(e.name)
            and not any(word in e.name for word in _CPU_BOOKKEEPING)]
  return "CPU XLA threads", events


def _busy_ns(events: List[Tuple[str, int, int]]) -> float:
  """The union of the events' intervals."""
  busy, end = 0.0, float("-inf")
  for _, start, duration in sorted(events, key=lambda e: e[1]):
    stop = start + duration
    if stop > end:
      busy += stop - max(start, end)
      end = stop
  return busy


def summarize_trace(data: ProfileData, per: float, top: int = 12) -> Dict[str, Any]:
  """The figures of a read trace, each divided by `per`."""
  where, events = _operations(data)
  if not events:
    return {"error": f"no operations found on {where}",
            "planes": {p.name: sorted({line.name for line in p.lines})[:20] for p in data.planes}}
  totals: Dict[str, List[float]] = {}
  for name, _, duration in events:
    entry = totals.setdefault(name, [0.0, 0])
    entry[0] += duration
    entry[1] += 1
  busy = _busy_ns(events)
  span = max(s + d for _, s, d in events) - min(s for _, s, _ in events)
  ranked = sorted(totals.items(), key=lambda item: item[1][0], reverse=True)[:top]
  return {"where": where, "per": per, "kernels": len(events) / per,
          "busy_ms": busy / per / 1e6, "span_ms": span / per / 1e6,
          "top": [{"name": name, "ms": total / per / 1e6, "count": count / per,
                   "share_of_busy": total / busy} for name, (total, count) in ranked]}


def summarize(fn: Callable[[], Any], calls: int = 1, per: float = 1.0,
              top: int = 12) -> Dict[str, Any]:
  """Traces `calls` calls of `fn` (each waited for) and summarizes them per `per` units. A
  profiler that fails (no tracer on this backend, an unreadable trace) is reported in the
  summary's "error", never raised: the benchmark's figures, measured before, are kept."""
  with tempfile.TemporaryDirectory() as directory:
    try:
      jax.profiler.start_trace(directory)
      try:
        for _ in range(calls):
          jax.block_until_ready(fn())
      finally:
        jax.profiler.stop_trace()
      paths = glob.glob(os.path.join(directory, "**", "*.xplane.pb"), recursive=True)
      if not paths:
        return {"error": "the profiler wrote no trace"}
      return summarize_trace(ProfileData.from_file(paths[0]), per * calls, top)
    except Exception as error:  # pylint: disable=broad-except  # a report, never a failure
      return {"error": f"profiling failed: {type(error).__name__}: {error}"}


def lines(summary: Dict[str, Any], top: int = 6) -> List[str]:
  """A few printable lines of a summary."""
  if "error" in summary:
    return [f"profile: {summary['error']}"]
  idle = summary["span_ms"] - summary["busy_ms"]
  out = [f"profile ({summary['where']}): {summary['kernels']:.0f} operations, busy "
         f"{summary['busy_ms']:.3f} ms of a {summary['span_ms']:.3f} ms span ({idle:.3f} ms idle "
         f"between them)"]
  out += [f"  {row['ms']:9.3f} ms {row['share_of_busy']:6.1%} x{row['count']:<6.0f} "
          f"{row['name'][:90]}" for row in summary["top"][:top]]
  return out
