"""The reproduction's outputs on synthetic results: claims verdicts, table1.md, REPORT.md,
figures, results.json and --redraw; the presets' variant lists."""

import dataclasses
import json
import pathlib
import struct

import pytest

from gqa_t5 import perf_model
from gqa_t5.benchmarks import decode_report
from gqa_t5.model.config import T5Config
from gqa_t5.reproduce.pipeline import presets
from gqa_t5.reproduce.report import claims
from gqa_t5.reproduce.report import markdown
from gqa_t5.reproduce.report import results as outputs
from gqa_t5.reproduce.report import run_results

# The mini preset plus a second GQA (K=4) at the uptraining alpha, as a preset may add.
PRESET = dataclasses.replace(presets.PRESETS["mini"], extra_kv_heads=(4,))
N = PRESET.num_heads
G = PRESET.gqa_kv_heads


def scores_for(average):
  """Per-task scores whose main metrics average to `average`; loss falls as quality rises."""
  loss = 10.0 - average / 10.0
  return {"demo_summarize": {"rouge1": average + 1.0, "rouge2": 1.0, "rougeL": 2.0,
                             "rougeLsum": 2.0, "loss": loss},
          "demo_translate_en_de": {"bleu": average - 2.0, "loss": loss + 0.5},
          "demo_qa": {"em": 3.0, "f1": average + 1.0, "loss": loss - 0.5}}


def synthetic(quality, times, noise_seed_shift=0.1, paper_timing=None):
  """results via outputs.assemble; quality: {(K, method, alpha): average} for seed 0;
  paper_timing: the paper-timing stage's result, if any."""
  evaluations = []
  for v in PRESET.quality_variants():
    base = quality[(v.kv_heads, v.method if v.kv_heads != N else "mean",
                    v.alpha if v.kv_heads != N else 0.0)]
    value = base + (noise_seed_shift if v.seed else 0.0)
    evaluations.append({"variant": v, "scores": scores_for(value), "finetune": {"step": 1},
                        "start_loss": 5.0 - base / 20.0})
  # Bytes per step: 1000 of weights plus 100 of caches per key/value head.
  timing = {"kv_heads": {str(k): {"time_per_sample": t, "time_per_step": t / 10,
                                  "bytes_per_step": {"weights": 1000, "cross_kv": 80 * k,
                                                     "self_cache": 20 * k,
                                                     "total": 1000 + 100 * k}}
                         for k, t in times.items()},
            "shape": {"batch": 8, "input_length": 256, "output_length": 64}}
  stages = {"timing": {"seconds": 3.0, "cached": True},       # not in sorted order
            "pretrain": {"seconds": 12.0, "cached": False}}
  return outputs.assemble(
      preset=PRESET, model=PRESET.model.replace(vocab_size=8192), pretrain={"step": 2000},
      pretrain_origin="pretrained here", evaluations=evaluations, timing=timing,
      stages=stages, wall_seconds=90.0, machine="test machine",
      paper_scale=outputs.paper_scale_summary(), paper_timing=paper_timing,
      conversions=[{"kv_heads": 1, "method": m, "start_loss": loss}
                   for m, loss in (("mean", 6.5), ("first", 7.25), ("random", 9.0))])


def paper_like_quality():
  """Numbers shaped like the paper's findings."""
  q = {(N, "mean", 0.0): 30.0}
  for a, mqa, gqa in ((0.0, 20.0, 27.0), (0.05, 28.0, 29.6), (0.10, 28.6, 29.8)):
    q[(1, "mean", a)] = mqa
    q[(G, "mean", a)] = gqa
  q[(4, "mean", 0.05)] = 29.7
  q[(1, "first", 0.05)] = 27.0
  q[(1, "random", 0.05)] = 25.0
  q[(1, "aligned", 0.05)] = 28.1
  return q


PAPER_LIKE_TIMES = {1: 1.0, 2: 1.05, 4: 1.2, 8: 2.0}


def verdicts(results):
  return {c.id: c.verdict for c in results.claims}


def _check(claim, measure):
  """A claim's verdict on a cross-check measure, or None where it has none."""
  check = claim.checks.get(measure)
  return None if check is None else check.verdict


def test_paper_like_numbers_hold_every_claim():
  results = synthetic(paper_like_quality(), PAPER_LIKE_TIMES)
  assert results.noise.average == pytest.approx(0.1)
  assert verdicts(results) == {"a": claims.HELD, "b": claims.HELD, "c": claims.HELD,
                               "d": claims.HELD}
  # The loss moves with quality here, so the loss verdicts agree.
  assert results.noise.loss == pytest.approx(0.01)
  assert [_check(c, "loss") for c in results.claims] == [claims.HELD] * 3 + [None]
  assert [_check(c, "start_loss") for c in results.claims] == [claims.HELD] * 3 + [None]
  a = next(c for c in results.claims if c.id == "a")
  assert ("Straight after conversion, before uptraining: mean 6.50, first 7.25, random 9.00 "
          "(MHA before conversion: 3.50)") in a.checks["start_loss"].evidence
  assert results.mha.loss == pytest.approx(7.0)
  b = next(c for c in results.claims if c.id == "b")
  assert b.numbers["recovered_share"] == pytest.approx(0.8)
  assert [v.short_label for v in results.headline] == ["MHA", "MQA", "GQA-2", "GQA-4"]


def test_contrary_numbers_fail_the_claims():
  q = paper_like_quality()
  q[(1, "first", 0.05)] = 29.0          # first beats mean
  q[(G, "mean", 0.0)] = 18.0            # GQA worse than MQA at alpha 0
  q[(G, "mean", 0.05)] = 26.0           # GQA far from MHA
  times = {1: 1.0, 2: 1.9, 4: 1.95, 8: 2.0}  # 1 -> 2 groups takes most of the rise
  results = synthetic(q, times)
  v = verdicts(results)
  assert v == {"a": claims.NOT_HELD, "b": claims.NOT_HELD, "c": claims.NOT_HELD,
               "d": claims.NOT_HELD}
  assert [_check(c, "loss") for c in results.claims][:3] == [claims.NOT_HELD] * 3


def test_differences_within_noise_are_inconclusive():
  q = paper_like_quality()
  q[(1, "mean", 0.05)] = 27.05          # mean only 0.05 above first: below the noise
  results = synthetic(q, PAPER_LIKE_TIMES, noise_seed_shift=0.5)
  assert verdicts(results)["a"] == claims.WITHIN_NOISE
  assert results.noise.average == pytest.approx(0.5)
  a = next(c for c in results.claims if c.id == "a")
  assert a.numbers["mean"] - a.numbers["first"] == pytest.approx(0.05)


def test_scores_at_the_floor_decide_nothing():
  q = {key: value / 10.0 for key, value in paper_like_quality().items()}  # all below 3.0
  results = synthetic(q, PAPER_LIKE_TIMES, noise_seed_shift=0.01)
  v = verdicts(results)
  assert v["a"] == v["b"] == v["c"] == claims.AT_FLOOR and v["d"] == claims.HELD
  assert max(v.average for v in results.variants) < claims.FLOOR
  assert claims.floor_note(results) in markdown.report_markdown(results)
  # The loss still decides.
  assert [_check(c, "loss") for c in results.claims[:3]] == [claims.HELD] * 3


def test_no_lead_of_mha_leaves_nothing_to_recover():
  q = paper_like_quality()
  q[(N, "mean", 0.0)] = 19.0  # MHA below MQA at alpha 0
  results = synthetic(q, PAPER_LIKE_TIMES)
  b = next(c for c in results.claims if c.id == "b")
  assert b.verdict == claims.NOT_HELD
  assert b.numbers["mha"] < b.numbers["mqa"]["0.0"]  # no lead of MHA to recover
  assert b.numbers["recovered_share"] is None


def test_time_that_falls_with_more_groups_breaks_claim_d():
  results = synthetic(paper_like_quality(), {1: 1.0, 2: 0.8, 4: 1.2, 8: 2.0})
  assert verdicts(results)["d"] == claims.NOT_HELD
  d = next(c for c in results.claims if c.id == "d")
  assert d.numbers["times"] == {"1": 1.0, "2": 0.8, "4": 1.2, "8": 2.0}


def test_without_a_noise_measurement_the_minis_measured_noise_is_used(tmp_path):
  quick = presets.PRESETS["quick"]
  assert quick.noise_seeds == ()
  results = synthetic(paper_like_quality(), PAPER_LIKE_TIMES)
  results.noise = run_results.Noise()
  results.claims = claims.evaluate_claims(results)
  a = next(c for c in results.claims if c.id == "a")
  assert a.tolerance == "seed noise 1.17, the mini preset's measured seed noise"
  assert a.checks["loss"].tolerance == "seed noise 0.04, the mini preset's measured seed noise"
  assert "Not measured at this preset" in markdown.report_markdown(results)


def test_the_default_noise_is_the_noise_the_committed_mini_run_measured():
  mini = json.loads((pathlib.Path(__file__).resolve().parents[1] / "results" / "mini"
                     / "results.json").read_text())
  for field, value in claims.DEFAULT_NOISE.items():
    assert mini["noise"][field] == pytest.approx(value, abs=0.005), field


def _claim(results, claim_id):
  return next(c for c in results.claims if c.id == claim_id)


# The verdict rules of docs/REPRODUCE.md: (mean - first, first - random) differences of average
# quality for claim (a), against a measured noise or none measured (the mini default, 1.17).
@pytest.mark.parametrize("mean_minus_first, first_minus_random, noise, verdict", [
    (2.0, 2.0, 0.5, claims.HELD),             # both beyond the measured noise
    (0.3, 2.0, 0.5, claims.WITHIN_NOISE),     # one inside it: inconclusive
    (-2.0, 2.0, 0.5, claims.NOT_HELD),        # first beats mean beyond the noise
    (-0.3, 2.0, 0.5, claims.WITHIN_NOISE),    # ... but inside it: inconclusive, not "did not"
    (0.5, 0.5, None, claims.WITHIN_NOISE),    # no noise measured: 0.5 < the default 1.17
    (2.0, 2.0, None, claims.HELD),            # beyond the default
    (-2.0, 2.0, None, claims.NOT_HELD),
])
def test_verdict_rules_table(mean_minus_first, first_minus_random, noise, verdict):
  q = paper_like_quality()
  q[(1, "mean", 0.05)] = 28.0
  q[(1, "first", 0.05)] = 28.0 - mean_minus_first
  q[(1, "random", 0.05)] = q[(1, "first", 0.05)] - first_minus_random
  results = synthetic(q, PAPER_LIKE_TIMES, noise_seed_shift=noise or 0.0)
  if noise is None:
    results.noise = run_results.Noise()
    results.claims = claims.evaluate_claims(results)
  assert _claim(results, "a").verdict == verdict


def test_close_to_mha_needs_a_lead_of_mha_over_mqa_beyond_the_noise():
  q = paper_like_quality()
  q[(N, "mean", 0.0)] = 28.0   # MHA does not lead MQA (28.0 at alpha 0.05)
  results = synthetic(q, PAPER_LIKE_TIMES, noise_seed_shift=0.5)
  c = _claim(results, "c")
  assert c.verdict == claims.WITHIN_NOISE
  assert "no gap for GQA to close" in c.evidence
  # A GQA that is slow is still "did not hold": its speed is not within any noise.
  slow = synthetic(q, {1: 1.0, 2: 1.9, 4: 1.95, 8: 2.0}, noise_seed_shift=0.5)
  assert _claim(slow, "c").verdict == claims.NOT_HELD


def _png_size(path):
  data = path.read_bytes()
  assert data[:8] == b"\x89PNG\r\n\x1a\n"
  return struct.unpack(">II", data[16:24])


def test_write_all_and_redraw(tmp_path):
  from gqa_t5.reproduce import cli
  results = synthetic(paper_like_quality(), PAPER_LIKE_TIMES)
  written = outputs.write_all(results, tmp_path, log=lambda line: None)
  names = sorted(p.split("/")[-1] for p in written)
  assert names == ["REPORT.md", "fig3.png", "fig4.png", "fig5.png", "fig6.png", "results.json",
                   "table1.md"]
  for fig in ("fig3.png", "fig4.png", "fig5.png", "fig6.png"):
    width, height = _png_size(tmp_path / fig)
    assert width > 300 and height > 200
  table = (tmp_path / "table1.md").read_text()
  assert "| MHA-XXL | 1.51 | 47.2 |" in table            # the paper's table beside ours
  mha = results.mha
  assert f"| MHA | {mha.time_per_sample * 1e3:.2f} | {mha.average:.2f} |" in table
  gqa_rows = [line for line in table.splitlines() if line.startswith("| GQA-2 (alpha ")]
  assert len(gqa_rows) == 3 + len(PRESET.noise_seeds)  # every alpha, and the noise repeat
  report_text = (tmp_path / "REPORT.md").read_text()
  assert "| (a) " in report_text and "**held**" in report_text
  assert "![Figure 6](fig6.png)" in report_text
  # K=8: 800 of 1800 bytes are caches; K=1: 100 of 1100.
  assert "Key/value caches are 44% of the bytes an MHA step reads and 9% of an MQA" in report_text
  assert (f"learning rate equal to the pretraining schedule's final rate "
          f"({PRESET.finetune_lr:.3g})") in report_text
  stored = json.loads((tmp_path / "results.json").read_text())
  assert stored == json.loads(json.dumps(results.to_json()))
  assert run_results.Results.from_json(stored).to_json() == stored
  # --redraw rebuilds everything from results.json alone, byte for byte what the run wrote
  # (the stages and the alpha curves were not in sorted order in the results it was given).
  before = {name: (tmp_path / name).read_bytes() for name in names}
  (tmp_path / "table1.md").unlink()
  (tmp_path / "fig4.png").unlink()
  assert cli.main(["--redraw", str(tmp_path)]) == 0
  assert (tmp_path / "table1.md").read_text() == table
  for name in names:
    assert (tmp_path / name).read_bytes() == before[name], name


def test_redraw_without_results_names_the_file(tmp_path):
  with pytest.raises(FileNotFoundError, match="results.json"):
    outputs.read_results(tmp_path)


def test_missing_metric_is_named():
  with pytest.raises(KeyError, match="demo_qa has no 'f1'"):
    outputs.main_scores({"demo_summarize": {"rouge1": 1.0},
                         "demo_translate_en_de": {"bleu": 1.0}, "demo_qa": {"em": 1.0}})


@pytest.mark.parametrize("name", ["quick", "mini", "test"])
def test_presets_list_every_variant_the_figures_need(name):
  p = presets.PRESETS[name]
  variants = p.quality_variants()
  keys = [v.key(p.num_heads) for v in variants]
  assert len(keys) == len(set(keys))
  for method in presets.METHODS:  # Fig. 4
    assert any(v.kv_heads == 1 and v.method == method and v.alpha == p.method_alpha
               for v in variants)
  for k in (1, p.gqa_kv_heads):  # Fig. 5
    assert sorted(v.alpha for v in variants if v.kv_heads == k and v.method == "mean"
                  and v.seed == 0) == sorted(p.alphas)
  assert (1, "aligned") in p.conversions() and (p.gqa_kv_heads, "mean") in p.conversions()
  assert p.timing_kv_heads()[0] == 1 and p.timing_kv_heads()[-1] == p.num_heads


def test_bad_presets_are_refused():
  base = presets.PRESETS["test"]
  with pytest.raises(ValueError, match="GQA key/value heads 3 must divide"):
    presets.ReproducePreset(**{**base.__dict__, "gqa_kv_heads": 3})
  with pytest.raises(ValueError, match="method_alpha 0.2 is not one of"):
    presets.ReproducePreset(**{**base.__dict__, "method_alpha": 0.2})
  with pytest.raises(ValueError, match="unknown preset 'huge'"):
    presets.get_preset("huge")


def test_a_fall_inside_the_timing_tolerance_is_within_noise_not_held():
  # K=4 slightly slower than K=8 (MHA): the shape holds only inside the 5% tolerance.
  results = synthetic(paper_like_quality(), {1: 1.0, 2: 1.02, 4: 2.02, 8: 2.0})
  d = next(c for c in results.claims if c.id == "d")
  assert d.verdict == claims.WITHIN_NOISE
  assert d.tolerance == "timing differences under 5% count as equal"
  text = markdown.report_markdown(results)
  assert "**inconclusive (within noise)** (tolerance: timing differences under 5% count as equal)" in text
  assert "(tolerance: seed noise 0.10, measured in this run)" in text  # quality verdicts too


def test_figures_and_tables_say_their_units():
  results = synthetic(paper_like_quality(), PAPER_LIKE_TIMES)
  table = markdown.table1_markdown(results)
  assert "| Average (%) |" in table and "Scores in %" in table
  report = markdown.report_markdown(results)
  assert "Above the floor?" in report and "Stated for this preset: 25-35 min" in report


@pytest.mark.parametrize("name", ["quick", "mini"])
def test_committed_results_load_typed_and_write_back_unchanged(name):
  # Both were written by this version: they load typed and write back unchanged.
  path = pathlib.Path(__file__).parent.parent / "results" / name / "results.json"
  stored = json.loads(path.read_text())
  results = run_results.Results.from_json(stored)
  assert results.to_json() == stored
  for field in ("pretrain_throughput", "paper_timing"):
    assert (getattr(results, field) is None) == (stored.get(field) is None), field
  assert results.mha.kv_heads == results.scale.num_heads == stored["scale"]["num_heads"]
  assert [v.key for v in results.variants] == [v["key"] for v in stored["variants"]]
  assert results.alpha_curves["MQA"][0].alpha == stored["alpha_curves"]["MQA"][0]["alpha"]


def test_an_older_results_json_loads_and_writes_back_as_it_was():
  # An earlier version wrote no pretrain_throughput, scale.dtype or conversions, and a later one
  # may write keys this version does not know: defaults on reading, and on writing back the file
  # as it was (no added defaults, the unknown keys kept).
  path = pathlib.Path(__file__).parent.parent / "results" / "quick" / "results.json"
  older = json.loads(path.read_text())
  for key in ("pretrain_throughput", "conversions"):
    del older[key]
  del older["scale"]["dtype"]
  older["scale"]["from_a_later_version"] = [1, 2]
  older["variants"][0]["also_later"] = "kept"
  results = run_results.Results.from_json(older)
  assert results.pretrain_throughput is None and results.conversions == []
  assert results.scale.dtype is None and results.variants[0].average == older["variants"][0][
      "average"]
  assert results.to_json() == older


def test_a_results_json_missing_a_required_field_is_named():
  stored = synthetic(paper_like_quality(), PAPER_LIKE_TIMES).to_json()
  del stored["scale"]["num_heads"]
  with pytest.raises(ValueError, match="Scale has no 'num_heads'"):
    run_results.Results.from_json(stored)


def test_paper_timing_rows_price_the_timed_model_on_a_gpu(monkeypatch, tmp_path):
  # The paper-timing stage's result as the stage writes it: the benchmark's model facts and
  # the timed shape in one dict per size. On a GPU each row gets the H200 roofline of the very
  # model timed (every size field read back), on a CPU none.
  config = T5Config(vocab_size=512, emb_dim=64, num_heads=8, head_dim=8, mlp_dim=128,
                    num_encoder_layers=3, num_decoder_layers=3, dtype="bfloat16")
  shape = {**decode_report.config_facts(config), "batch": 4, "input_length": 64,
           "output_length": 16}
  times = {"1": 0.20, "8": 0.50}
  measured = {"runs": {"xxl": {"kv_heads": {k: {"time_per_sample": t, "time_per_step": t / 20}
                                            for k, t in times.items()},
                               "shape": shape, "dtype": "bfloat16", "repeats": 1}},
              "bandwidth_bytes_per_s": 4.0e12}
  sim = outputs.paper_scale_summary()
  assert all(r.roofline_here is None
             for r in outputs.paper_timing_rows(measured, sim).rows.values())
  monkeypatch.setattr(outputs.jax, "default_backend", lambda: "gpu")
  table = outputs.paper_timing_rows(measured, sim)
  assert list(table.rows) == ["MQA-XXL", "MHA-XXL"]
  setup = perf_model.Setup(chips=1, model_parallel=1, max_batch_per_chip=4, input_length=64,
                           output_length=16)
  for name, k in (("MQA-XXL", 1), ("MHA-XXL", 8)):
    row = table.rows[name]
    assert row.measured == times[str(k)] and row.kv_heads == k
    assert row.roofline_here == perf_model.time_per_sample(
        config.replace(num_kv_heads=k), setup, perf_model.H200, batch_per_chip=4)["total"]
    assert row.roofline_tpu == sim.xxl(k)
  assert table.rows["MQA-XXL"].roofline_here < table.rows["MHA-XXL"].roofline_here
  assert (table.batch, table.dtype, table.input_length) == (4, "bfloat16", 64)
  # The whole report on a GPU: table1.md shows the roofline-here column.
  results = synthetic(paper_like_quality(), PAPER_LIKE_TIMES, paper_timing=measured)
  outputs.write_all(results, tmp_path, log=lambda _: None)
  here = table.rows["MQA-XXL"].roofline_here
  text = (tmp_path / "table1.md").read_text()
  row = f"| MQA-XXL | 200.0 | 0.400 | {here * 1e3:.1f} |"
  # By size and K as in the paper, not results.json's order by name (MHA before MQA).
  assert row in text and text.index(row) < text.index("| MHA-XXL | 500.0 | 1.000 |")


def test_pretraining_mfu_is_reported_on_a_gpu_only(monkeypatch, tmp_path):
  # MFU = the model's training FLOPs per token x tokens/s / the H200's peak; a CPU has no peak.
  model = PRESET.model.replace(vocab_size=8192)
  lengths = {"inputs": 64, "targets": 16}
  pretrain = {"step": 10, "steady_tokens_per_second": 5.0e5}
  on_cpu = outputs.pretrain_throughput(pretrain, model, lengths)
  assert on_cpu.mfu is None and on_cpu.compile_excluded
  monkeypatch.setattr(outputs.jax, "default_backend", lambda: "gpu")
  on_gpu = outputs.pretrain_throughput(pretrain, model, lengths)
  flops = perf_model.train_step_flops(model, batch=1, input_length=64, target_length=16)
  assert on_gpu.flops_per_token == pytest.approx(flops / 80)
  assert on_gpu.mfu == pytest.approx(flops / 80 * 5.0e5 / perf_model.H200.peak_flops)
  results = synthetic(paper_like_quality(), PAPER_LIKE_TIMES)
  results.pretrain_throughput = on_gpu
  outputs.write_all(results, tmp_path, log=lambda _: None)
  assert (f"{100 * on_gpu.mfu:.1f}% MFU ({on_gpu.flops_per_token / 1e6:.3g} MFLOP per token"
          in (tmp_path / "REPORT.md").read_text())


def test_a_timing_shape_without_the_models_sizes_names_what_it_lacks():
  shape = run_results.TimingShape.from_json({"batch": 8, "input_length": 64,
                                             "output_length": 16})
  with pytest.raises(ValueError, match="no emb_dim, num_heads, head_dim, mlp_dim, layers"):
    shape.config(1)
