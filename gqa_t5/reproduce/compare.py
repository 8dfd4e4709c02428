"""`gqa-t5 reproduce --compare REFERENCE`: a run's numbers checked against reference results.

Both sides are `results.json` files (or the folders holding them). Every leaf is compared by
its path (list items matched by their `key`, `id`, (`kv_heads`, `method`) or `alpha`, not by
position), in three kinds:

  computed  losses, scores, steps, byte counts, configuration: the pipeline is deterministic on
            one machine, so these must agree within `RTOL` (relative) / `ATOL` (absolute); a
            different CPU or library build may move the last digits, never more.
  labels    strings that are results (verdicts, labels, methods): must be equal. Prose
            (`evidence`, `statement`, descriptions, the preset's stated time) is not compared:
            its numbers are compared where they live.
  measured  wall-clock times, throughputs, bandwidths, roofline fractions, MFU, the machine,
            claim (c)'s verdicts (they need the speed) and claim (d) (judged on times): they
            differ from machine to machine, so they are listed as information and never fail
            a comparison.

The exit status is 1 when a computed number or a label differs (or a path exists on one side
only), 0 otherwise.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Tuple

RTOL = 1e-4
ATOL = 1e-6
_PROSE = re.compile(r"(evidence|statement|description|time_figure|model_dir|data_fingerprint)$")
_MEASURED_LEAF = re.compile(r"(seconds|^time_per|_time_per|tokens_per_second|roofline_fraction"
                            r"|roofline_here|bandwidth|^measured$|^mfu$|^cached$)")
_MEASURED_SECTIONS = ("machine", "stages")
# Claims judged on measured times: (c) needs the speed for its verdicts, (d) is all timing.
_TIME_JUDGED = {"c": ("verdict", "loss_verdict", "start_loss_verdict", "speed_share"), "d": None}
_LIST_KEYS = (("key",), ("id",), ("kv_heads", "method"), ("alpha",), ("name",))
ABSENT = "<absent>"  # the side of a Difference where the path does not exist


@dataclasses.dataclass(frozen=True)
class Difference:
  path: str
  kind: str          # 'computed', 'label', 'measured', 'missing'
  run: Any
  reference: Any

  def line(self) -> str:
    if self.kind == "missing":
      return f"{self.path}: only in the {'reference' if self.run is ABSENT else 'run'}"
    text = f"{self.path}: run {_show(self.run)}, reference {_show(self.reference)}"
    if _is_number(self.run) and _is_number(self.reference) and self.reference:
      text += f" ({(self.run - self.reference) / abs(self.reference):+.2%})"
    return text


@dataclasses.dataclass
class Comparison:
  compared: Dict[str, int]           # kind -> leaves compared
  differences: List[Difference]

  @property
  def failures(self) -> List[Difference]:
    return [d for d in self.differences if d.kind != "measured"]

  def lines(self, limit: int = 40) -> List[str]:
    counts = ", ".join(f"{n} {kind}" for kind, n in sorted(self.compared.items()))
    out = [f"compared {counts}: {len(self.failures)} differ beyond tolerance (rtol {RTOL:g}, "
           f"atol {ATOL:g}); {len(self.differences) - len(self.failures)} measured figures "
           f"differ (information: they vary by machine)"]
    for diff in self.failures[:limit]:
      out.append(f"  DIFFERS  {diff.line()}")
    if len(self.failures) > limit:
      out.append(f"  ... and {len(self.failures) - limit} more")
    measured = [d for d in self.differences if d.kind == "measured"]
    for diff in measured[:10]:
      out.append(f"  measured {diff.line()}")
    if len(measured) > 10:
      out.append(f"  ... and {len(measured) - 10} more measured figures")
    return out


def _show(value: Any) -> str:
  if isinstance(value, float):
    return f"{value:.6g}"
  return repr(value)


def _is_number(value: Any) -> bool:
  return isinstance(value, (int, float)) and not isinstance(value, bool)


def read_json(path: str) -> Dict[str, Any]:
  """The plain JSON of results.json at `path`, or in the folder `path` (`compare` walks it as
  JSON; `results.read_results` reads it typed); a clear error when it is not there."""
  p = Path(path)
  if p.is_dir():
    p = p / "results.json"
  if not p.is_file():
    raise FileNotFoundError(f"no results.json at {path}: give a run's output folder or its "
                            f"results.json")
  try:
    with open(p) as f:
      return json.load(f)
  except ValueError as error:
    raise ValueError(f"{p} is not valid JSON: {error}") from None


def _item_name(item: Any, index: int) -> str:
  if isinstance(item, dict):
    for keys in _LIST_KEYS:
      if all(k in item for k in keys):
        return ",".join(f"{k}={item[k]}" for k in keys)
  return str(index)


def flatten(value: Any, path: str = "") -> Iterator[Tuple[str, Any]]:
  """(path, leaf) for every leaf; list items named by their identifying fields."""
  if isinstance(value, dict):
    for key, item in value.items():
      yield from flatten(item, f"{path}/{key}")
  elif isinstance(value, list):
    for i, item in enumerate(value):
      yield from flatten(item, f"{path}[{_item_name(item, i)}]")
  else:
    yield path, value


def _agree(run: Any, reference: Any) -> bool:
  if _is_number(run) and _is_number(reference):
    if math.isnan(run) or math.isnan(reference):
      return math.isnan(run) and math.isnan(reference)
    return abs(run - reference) <= ATOL + RTOL * abs(reference)
  return run == reference


def compare(run: Dict[str, Any], reference: Dict[str, Any]) -> Comparison:
  """Every leaf of `run` against the same path of `reference`."""
  ours, theirs = dict(flatten(run)), dict(flatten(reference))
  compared: Dict[str, int] = {}
  differences = []
  for path in sorted(set(ours) | set(theirs)):
    value = ours.get(path, theirs.get(path))
    kind = _kind(path, value)
    if kind is None:
      continue
    if path not in ours or path not in theirs:
      if kind != "measured":
        differences.append(Difference(path, "missing", ours.get(path, ABSENT),
                                      theirs.get(path, ABSENT)))
      continue
    compared[kind] = compared.get(kind, 0) + 1
    if not _agree(ours[path], theirs[path]):
      differences.append(Difference(path, kind, ours[path], theirs[path]))
  return Comparison(compared, differences)


def _kind(path: str, value: Any) -> Optional[str]:
  parts = [p for p in re.split(r"[/\[\]]", path) if p]
  leaf = parts[-1] if parts else ""
  if _PROSE.search(leaf):
    return None
  if parts and parts[0] in _MEASURED_SECTIONS:
    return "measured"
  if parts and parts[0] == "claims" and len(parts) > 1:
    claim = parts[1].removeprefix("id=")
    if claim in _TIME_JUDGED and (_TIME_JUDGED[claim] is None or leaf in _TIME_JUDGED[claim]):
      return "measured"
  if not path.startswith("/preset/") and _MEASURED_LEAF.search(leaf):
    return "measured"
  return "label" if isinstance(value, str) else "computed"


def compare_files(run_path: str, reference_path: str) -> Comparison:
  return compare(read_json(run_path), read_json(reference_path))
