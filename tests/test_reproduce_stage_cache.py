"""The reproduction's stage cache: cached, resumable, all-or-nothing stages."""

import json

import pytest

from gqa_t5.reproduce.pipeline import stage_cache


class Counter:
  """A stage function that records its calls and writes a file into its work directory."""

  def __init__(self, value=1):
    self.calls = 0
    self.value = value

  def __call__(self, work):
    self.calls += 1
    (work / "out.txt").write_text(str(self.value))
    return {"value": self.value, "file": "out.txt"}


def make_store(tmp_path):
  lines = []
  return stage_cache.StageStore(tmp_path, log=lines.append), lines


def test_a_finished_stage_is_skipped_and_its_result_returned(tmp_path):
  store, lines = make_store(tmp_path)
  fn = Counter(7)
  first = store.run("train", {"steps": 10}, fn)
  assert not first.cached and fn.calls == 1
  assert (first.directory / "out.txt").read_text() == "7"
  assert first.directory == tmp_path / "stages" / "train"
  assert not (tmp_path / "stages" / "train.work").exists()
  again, lines2 = make_store(tmp_path)
  second = again.run("train", {"steps": 10}, fn)
  assert second.cached and fn.calls == 1
  assert second.result == {"value": 7, "file": "out.txt"}
  assert second.key == first.key
  assert any("cached" in line for line in lines2)
  assert again.executed == []


def test_a_changed_configuration_redoes_the_stage(tmp_path):
  store, lines = make_store(tmp_path)
  fn = Counter()
  store.run("train", {"steps": 10}, fn)
  changed = store.run("train", {"steps": 20}, fn)
  assert fn.calls == 2 and not changed.cached
  assert json.loads((changed.directory / stage_cache.STAGE_FILE).read_text())["config"] == {
      "steps": 20}
  assert any("configuration changed" in line for line in lines)


def test_a_changed_upstream_stage_redoes_the_downstream_one(tmp_path):
  store, _ = make_store(tmp_path)
  up, down = Counter(1), Counter(2)
  a = store.run("up", {"x": 1}, up)
  store.run("down", {}, down, deps=[a])
  a2 = store.run("up", {"x": 2}, up)
  redone = store.run("down", {}, down, deps=[a2])
  assert down.calls == 2 and not redone.cached
  kept = store.run("down", {}, down, deps=[a2])
  assert kept.cached and down.calls == 2


def test_an_interrupted_stage_resumes_from_its_work_directory(tmp_path):
  store, lines = make_store(tmp_path)
  attempts = []

  def flaky(work):
    attempts.append(sorted(p.name for p in work.iterdir()))
    progress = work / "progress.txt"
    done = int(progress.read_text()) if progress.exists() else 0
    progress.write_text(str(done + 5))  # "trained" 5 more steps, checkpointed
    if done + 5 < 10:
      raise KeyboardInterrupt  # killed mid-stage
    return {"steps": done + 5}

  with pytest.raises(KeyboardInterrupt):
    store.run("train", {"steps": 10}, flaky)
  work = tmp_path / "stages" / "train.work"
  assert work.is_dir() and not (tmp_path / "stages" / "train").exists()
  assert store.finished("train") is None
  result = stage_cache.StageStore(tmp_path, log=lines.append).run("train", {"steps": 10}, flaky)
  assert result.result == {"steps": 10}
  assert "progress.txt" in attempts[1]  # the second attempt saw the first one's work
  assert any("resuming" in line for line in lines)
  assert not work.exists()
  assert result.seconds >= 0.0


def test_an_interrupted_stage_with_another_configuration_starts_over(tmp_path):
  store, _ = make_store(tmp_path)

  def crash(work):
    (work / "stale.txt").write_text("old")
    raise RuntimeError("boom")

  with pytest.raises(RuntimeError):
    store.run("train", {"steps": 10}, crash)
  seen = []

  def fresh(work):
    seen.extend(p.name for p in work.iterdir())
    return {}

  store.run("train", {"steps": 99}, fresh)
  assert "stale.txt" not in seen


def test_results_and_configurations_must_be_json(tmp_path):
  store, _ = make_store(tmp_path)
  with pytest.raises(stage_cache.StageError, match="not plain JSON"):
    store.run("bad-config", {"value": object()}, Counter())
  with pytest.raises(stage_cache.StageError, match="not plain JSON"):
    store.run("bad-result", {}, lambda work: {"nan": float("nan")})
  assert not (tmp_path / "stages" / "bad-result").exists()  # nothing half-finished


@pytest.mark.parametrize("name", ["", "../escape", "a/b", ".hidden", "sp ace"])
def test_stage_names_are_checked(tmp_path, name):
  store, _ = make_store(tmp_path)
  with pytest.raises(stage_cache.StageError, match="stage name"):
    store.run(name, {}, Counter())


def test_keys_depend_on_name_config_and_dependencies():
  base = stage_cache.stage_key("a", {"x": 1})
  assert base == stage_cache.stage_key("a", {"x": 1})
  assert base != stage_cache.stage_key("b", {"x": 1})
  assert base != stage_cache.stage_key("a", {"x": 2})
  dep = stage_cache.StageResult("up", "k1", None, {}, False, 0.0)
  assert base != stage_cache.stage_key("a", {"x": 1}, [dep])
  # Key order inside the configuration does not matter.
  swapped = stage_cache.stage_key("a", {"y": 2, "x": 1})
  assert stage_cache.stage_key("a", {"x": 1, "y": 2}) == swapped
