"""`gqa-t5 reproduce --compare`: which differences fail a comparison and which are information."""

import copy
import json
from pathlib import Path

import pytest

from gqa_t5.reproduce import cli
from gqa_t5.reproduce import compare

RESULTS = Path(__file__).resolve().parents[1] / "results"
REFERENCE = {
    "variants": [
        {"key": "mha-s0", "loss": 6.5, "average": 1.25, "time_per_step": 0.004,
         "label": "MHA", "finetune": {"step": 230, "tokens_per_second": 4000.0,
                                      "model_dir": "model"}},
        {"key": "mqa-mean-s0", "loss": 6.6, "average": 0.5, "time_per_step": 0.003,
         "label": "MQA", "finetune": {"step": 230, "tokens_per_second": 4200.0,
                                      "model_dir": "model"}},
    ],
    "claims": [
        {"id": "a", "verdict": "held", "evidence": "mean 6.6 > first 6.7"},
        {"id": "d", "verdict": "held", "numbers": {"share": 0.5}},
        {"id": "c", "verdict": "did not hold", "numbers": {"gqa_shortfall": 0.1}},
    ],
    "preset": {"timing_batch": 8, "name": "quick", "time_figure": "5.6-12.9 min"},
    "machine": {"cpu_count": 2},
    "wall_seconds": 250.0,
}


def _edit(path, value):
  run = copy.deepcopy(REFERENCE)
  target = run
  for key in path[:-1]:
    target = target[key]
  target[path[-1]] = value
  return run


@pytest.mark.parametrize("path, value, fails, measured", [
    # computed numbers: within rtol 1e-4 agree, beyond differ
    (("variants", 0, "loss"), 6.5 * (1 + 5e-5), False, False),
    (("variants", 0, "loss"), 6.5 * (1 + 5e-3), True, False),
    (("variants", 1, "finetune", "step"), 229, True, False),
    (("preset", "timing_batch"), 16, True, False),          # configuration, not a time
    # labels: equal or a difference
    (("claims", 0, "verdict"), "did not hold", True, False),
    (("variants", 0, "label"), "MHA-8", True, False),
    # measured: listed, never failing
    (("variants", 0, "time_per_step"), 0.008, False, True),
    (("variants", 1, "finetune", "tokens_per_second"), 1000.0, False, True),
    (("claims", 1, "verdict"), "did not hold", False, True),  # claim (d) is judged on times
    (("claims", 1, "numbers", "share"), 0.9, False, True),
    (("claims", 2, "verdict"), "held", False, True),          # (c) needs the speed
    (("claims", 2, "numbers", "gqa_shortfall"), 0.5, True, False),  # its quality is computed
    (("machine", "cpu_count"), 16, False, True),
    (("wall_seconds",), 900.0, False, True),
    # prose and paths are not compared
    (("claims", 0, "evidence"), "other words", False, False),
    (("variants", 0, "finetune", "model_dir"), "/elsewhere", False, False),
    (("preset", "time_figure"), "13 min", False, False),  # a stated time, not a result
])
def test_what_differs_and_what_is_information(path, value, fails, measured):
  result = compare.compare(_edit(path, value), REFERENCE)
  assert bool(result.failures) == fails
  assert any(d.kind == "measured" for d in result.differences) == measured
  assert len(result.differences) == int(fails or measured)


def test_identical_results_agree_and_list_order_does_not_matter():
  run = copy.deepcopy(REFERENCE)
  run["variants"].reverse()
  result = compare.compare(run, REFERENCE)
  assert result.differences == []
  assert result.compared["computed"] > 0 and result.compared["label"] > 0


def test_a_path_on_one_side_only_is_a_difference():
  run = copy.deepcopy(REFERENCE)
  run["variants"].append({"key": "gqa2-mean-s0", "loss": 6.55})
  failures = compare.compare(run, REFERENCE).failures
  assert [d.path for d in failures] == ["/variants[key=gqa2-mean-s0]/key",
                                        "/variants[key=gqa2-mean-s0]/loss"]
  assert all(d.kind == "missing" and "only in the run" in d.line() for d in failures)
  failures = compare.compare(REFERENCE, run).failures
  assert len(failures) == 2 and all("only in the reference" in d.line() for d in failures)


def test_the_command_compares_a_run_folder_with_a_reference(tmp_path, capsys):
  (tmp_path / "ref").mkdir()
  (tmp_path / "ref" / "results.json").write_text(json.dumps(REFERENCE))
  (tmp_path / "run").mkdir()
  (tmp_path / "run" / "results.json").write_text(json.dumps(REFERENCE))
  assert cli.main(["--compare", str(tmp_path / "ref"), "--out", str(tmp_path / "run")]) == 0
  changed = _edit(("variants", 0, "loss"), 7.0)
  (tmp_path / "run" / "results.json").write_text(json.dumps(changed))
  assert cli.main(["--compare", str(tmp_path / "ref"), "--out", str(tmp_path / "run")]) == 1
  out = capsys.readouterr().out
  assert "DIFFERS  /variants[key=mha-s0]/loss: run 7, reference 6.5" in out
  assert cli.main(["--compare", str(tmp_path / "nowhere"), "--out", str(tmp_path / "run")]) == 2
  assert "no results.json at" in capsys.readouterr().err


def test_the_committed_references_compare_clean_with_themselves():
  for name in ("quick", "mini"):
    folder = str(RESULTS / name)
    result = compare.compare_files(folder, folder)
    assert result.differences == [] and result.compared["computed"] > 100
