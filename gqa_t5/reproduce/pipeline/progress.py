"""One progress line per stage: "stage i/N name (expected ~X s) | elapsed, ETA".

The stage list (every stage's name and expected seconds) is known before the first stage runs.
The ETA is the expected time of the stages left, scaled by how the stages run so far compared
with their expectations (cached stages count as taking no time, and the scale only applies once a
stage has really run, so the first estimate is the plain expectation, not an extrapolation
from a compile-heavy first step). Stages a resumed run finds finished on disk count as cached
from the start (`finished_before`): a run with one stage left expects that one stage, not the
whole list; one of them that turns out stale (its inputs changed) is counted again when it runs.
"""

from __future__ import annotations

import time
from typing import Callable, Dict, Iterable, List, Tuple

from gqa_t5.reproduce.pipeline import estimate


class StageProgress:
  """Counts stages against `stages` ([(name, expected seconds)], in run order) and prints a line
  per stage."""

  def __init__(self, stages: List[Tuple[str, float]], log: Callable[[str], None] = print,
               finished_before: Iterable[str] = ()):
    self.stages = stages
    self.expected: Dict[str, float] = dict(stages)
    self.index = {name: i for i, (name, _) in enumerate(stages)}
    self.log = log
    self.start = time.perf_counter()
    self.done: Dict[str, float] = {}       # name -> seconds it took now (0 when cached)
    self.finished_before = set(finished_before) & set(self.expected)  # likely cached
    self.ran_expected = 0.0                 # expectation of the stages that really ran
    self.ran_actual = 0.0

  @property
  def total(self) -> int:
    return len(self.stages)

  def _scale(self) -> float:
    if self.ran_expected <= 0.0:
      return 1.0
    # Bounded, so one slow first stage cannot make the ETA absurd.
    return min(max(self.ran_actual / self.ran_expected, 0.25), 4.0)

  def expected_left(self) -> float:
    """Expected seconds of the stages neither done nor finished before this run."""
    return sum(s for name, s in self.stages
               if name not in self.done and name not in self.finished_before)

  def eta(self) -> float:
    return self.expected_left() * self._scale()

  def begin(self, name: str, cached: bool = False) -> None:
    if not cached:
      self.finished_before.discard(name)  # stale: it runs after all
    i = self.index.get(name)
    position = f"{i + 1}/{self.total}" if i is not None else f"?/{self.total}"
    expected = self.expected.get(name, 0.0)
    elapsed = time.perf_counter() - self.start
    what = "cached" if cached else f"expected ~{estimate.format_seconds(expected)}"
    self.log(f"stage {position} {name} ({what}) | elapsed {estimate.format_seconds(elapsed)}"
             f", ETA {estimate.format_seconds(self.eta())}")

  def end(self, name: str, seconds: float, cached: bool) -> None:
    self.done[name] = 0.0 if cached else seconds
    if not cached:
      self.ran_expected += self.expected.get(name, 0.0)
      self.ran_actual += seconds
