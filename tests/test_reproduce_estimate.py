"""Expected stage times, progress lines, the gpu preset's sizing and the smoke shrink: pure
arithmetic on the presets (no training)."""

import io
import json
import pathlib

import pytest

from gqa_t5 import metrics_writer
from gqa_t5 import perf_model
from gqa_t5.reproduce.pipeline import estimate
from gqa_t5.reproduce.pipeline import presets
from gqa_t5.reproduce.pipeline import progress
from gqa_t5.reproduce.pipeline import stage_table
from gqa_t5.reproduce.pipeline import training

GPU = presets.PRESETS["gpu"]
REPO = pathlib.Path(__file__).resolve().parent.parent
# Span-corruption targets for 256 and 64 input tokens (tasks.pretrain_lengths, without seqio).
LENGTHS = {"gpu": {"inputs": 256, "targets": 58}, "quick": {"inputs": 64, "targets": 14}}


def plan_of(name, vocab_size=8192):
  p = presets.PRESETS[name]
  config = p.model.replace(vocab_size=vocab_size)
  return estimate.expected_seconds(p, config, estimate.MACHINES[p.machine], LENGTHS[name])


def test_the_gpu_preset_is_sized_for_minutes_on_an_h200():
  plan = plan_of("gpu")
  total = sum(s for _, s in plan)
  assert 360 < total <= 480
  assert f"about {total / 60:.1f} min on one H200, a computed estimate" in GPU.time_figure
  config = GPU.model.replace(vocab_size=8192)
  assert 50e6 < sum(perf_model.matmul_params(config).values()) < 60e6
  assert config.num_heads == 8 and config.dtype == "bfloat16"
  # The performance model's FLOPs of a pretraining step (128 x (256 + 58) tokens: the encoder's
  # weights on the inputs, the decoder's on the targets) at 30% of 989 TFLOP/s: about 23 ms.
  step = perf_model.train_step_flops(config, batch=GPU.pretrain_batch, input_length=256,
                                     target_length=58)
  assert step / estimate.MACHINES["h200"].flops_per_s == pytest.approx(0.0229, rel=0.01)
  pretrain = dict(plan)["pretrain"]
  h200 = estimate.MACHINES["h200"]
  assert pretrain == pytest.approx(h200.stage_start_s + h200.compile_s
                                   + GPU.pretrain_steps * step / h200.flops_per_s)
  names = [name for name, _ in plan]
  assert names[0] == "pretrain" and names[-1] == "paper-timing" and len(names) == len(set(names))
  kv = {t.size: t.kv_heads for t in GPU.paper_timing}
  assert kv == {"xxl": (1, 4, 8, 16, 32, 64), "large": (16,)}
  assert all((t.input_length, t.output_length, t.dtype) == (2048, 512, "bfloat16")
             for t in GPU.paper_timing)


def test_the_cpu_estimate_is_near_the_committed_quick_run():
  # estimate.MACHINES["cpu"] is fitted to the committed quick run's stage times.
  committed = json.loads((REPO / "results" / "quick" / "results.json").read_text())
  total = sum(s for _, s in plan_of("quick", committed["scale"]["vocab_size"]))
  assert 0.85 * committed["stage_seconds"] < total < 1.15 * committed["stage_seconds"]


def test_smoke_keeps_the_stages_and_the_head_structure():
  smoke = presets.smoke(GPU)
  assert smoke.num_heads == GPU.num_heads and smoke.alphas == GPU.alphas
  assert smoke.noise_seeds == GPU.noise_seeds and smoke.gqa_kv_heads == GPU.gqa_kv_heads
  assert smoke.pretrain_steps <= 20 and smoke.model.emb_dim == 32
  xxl = next(t for t in smoke.paper_timing if t.size == "xxl")
  assert xxl.kv_heads == (1, 8, 64) and xxl.config().num_heads == 64
  assert xxl.config().emb_dim == 32 and xxl.config().num_decoder_layers == 1
  assert presets.get_preset("quick", smoke_test=True).name == "quick-smoke"
  assert "test" not in presets.public_names() and "gpu" in presets.public_names()


def test_progress_lines_count_stages_and_bound_the_eta():
  lines = []
  bar = progress.StageProgress([("a", 10.0), ("b", 20.0), ("c", 30.0)], log=lines.append)
  bar.begin("a")
  assert lines[-1].startswith("stage 1/3 a (expected ~10 s) | elapsed 0 s, ETA 60 s")
  bar.end("a", seconds=1000.0, cached=False)  # a compile-heavy stage far over its estimate
  assert bar.eta() == pytest.approx(4.0 * 50.0)  # scaled, but at most 4x
  bar.begin("b", cached=True)
  bar.end("b", 0.0, cached=True)
  bar.begin("c")
  assert lines[-2].startswith("stage 2/3 b (cached)")
  assert lines[-1].startswith("stage 3/3 c (expected ~30 s)")


def test_a_resumed_runs_eta_counts_only_the_stages_left():
  lines = []
  bar = progress.StageProgress([("a", 10.0), ("b", 20.0), ("c", 30.0)], log=lines.append,
                               finished_before=["a", "b", "not-in-the-plan"])
  assert bar.expected_left() == 30.0  # one stage left: its time, not the whole plan's
  bar.begin("a", cached=True)
  assert lines[-1].endswith("ETA 30 s")
  bar.end("a", 0.0, cached=True)
  bar.begin("b")  # finished before but stale: it runs after all and counts again
  assert lines[-1].endswith("ETA 50 s")


def test_steady_throughput_leaves_the_compile_out(tmp_path):
  # 100 tokens a step from step 0; the first step took 10 s (compile), then 1 s a step.
  records = []
  for step in (1, 5, 9):
    elapsed = 10.0 + (step - 1) * 1.0
    records.append({"split": "train", "step": step, "tokens_per_second": step * 100 / elapsed})
  (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
  assert training.steady_tokens_per_second(tmp_path, 100, 0) == pytest.approx(100.0)
  (tmp_path / "metrics.jsonl").write_text(json.dumps(records[0]) + "\n")
  assert training.steady_tokens_per_second(tmp_path, 100, 0) is None


def test_format_seconds():
  assert estimate.format_seconds(42) == "42 s"
  assert estimate.format_seconds(471) == "7:51 min"
  assert estimate.format_seconds(3725) == "1:02:05 h"


def test_the_training_bars_eta_leaves_the_compiled_first_step_out(monkeypatch):
  clock = iter([0.0, 100.0, 101.0])  # start; step 1 after a 100 s compile; step 2 after 1 s
  monkeypatch.setattr(metrics_writer.time, "perf_counter", lambda: next(clock))
  stream = io.StringIO()
  bar = metrics_writer.Progress(0, 1001, stream=stream)
  bar.update(1, 10.0)
  assert stream.getvalue().endswith("ETA ?")  # no rate yet: not 27 hours
  bar.update(2, 10.0)
  assert "ETA 0:16:39" in stream.getvalue()  # 999 steps at 1 s each


def test_the_estimate_prices_exactly_the_stage_table():
  p = presets.PRESETS["quick"]
  table = stage_table.stage_table(p, p.num_heads)
  assert [name for name, _ in plan_of("quick")] == [stage.name for stage in table]
  rows = {stage.name: stage for stage in table}
  # The larger alpha continues the smaller one's run of the same conversion.
  assert rows["uptrain-gqa2-mean-a0.1"].needs == ("convert-gqa2-mean", "uptrain-gqa2-mean-a0.05")
  assert rows["uptrain-gqa2-mean-a0.05"].needs == ("convert-gqa2-mean",)
  assert [rows[name].steps for name in ("uptrain-mqa-mean-a0.05", "uptrain-mqa-mean-a0.1")] == [
      p.uptrain_steps(0.05), p.uptrain_steps(0.10) - p.uptrain_steps(0.05)]
  # Every stage reads only stages before it, and the checkpoints it reads exist.
  seen = set()
  for stage in table:
    assert set(stage.needs) <= seen, stage.name
    if stage.kind in ("finetune", "uptrain", "convert", "probe"):
      assert all(rows[need].output is not None for need in stage.needs), stage.name
    seen.add(stage.name)
  assert rows["finetune-mha-s0"].needs == ("pretrain",)
  assert sum(stage.kind == "eval" for stage in table) == len(p.quality_variants())
  with pytest.raises(ValueError, match="unknown kind 'train'"):
    stage_table.Stage("x", "train")
