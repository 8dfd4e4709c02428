"""TPU v4 compiles on a CPU machine (libtpu, the `tpu` extra): a tiny model's train and decode
steps compiled for a v4-8 slice fit a chip, the key/value layout follows the rules (K heads
sharded over the model axis when K is a multiple of it, replicated otherwise), and the compiled
decode step reads fewer bytes as K falls. Skips where libtpu is not installed.

Also the pure parts that need no libtpu: the fit verdict and the compiler-error parsing of
gqa_t5/aot.py, the slice table, the job selection, the performance model's train-step time and
the report that merges compiles made on several machines.
"""

import importlib.util
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gqa_t5 import aot
from gqa_t5 import models
from gqa_t5 import optim, schedules
from gqa_t5 import partitioning
from gqa_t5 import perf_model
from gqa_t5 import t5x_compat
from gqa_t5 import tpu_topology
from gqa_t5 import trainer
from gqa_t5.model import network
from gqa_t5.model import sizes
from gqa_t5.reproduce.paper_scale import compile as compile_lib
from gqa_t5.reproduce.paper_scale import jobs as jobs_lib
from gqa_t5.reproduce.paper_scale import tpu_timing

REPO = Path(__file__).resolve().parents[1]
HAS_LIBTPU = importlib.util.find_spec("libtpu") is not None
needs_libtpu = pytest.mark.skipif(not HAS_LIBTPU,
                                  reason="libtpu is not installed (pip install -e '.[tpu]')")
GIB = 2 ** 30
V4_AVAILABLE = perf_model.TPU_V4.available_bytes


# ---- no libtpu needed ------------------------------------------------------------------------

def test_slices_count_chips_and_wrap_from_a_full_cube():
  assert tpu_topology.get_slice("v4-256").chips == 128
  assert tpu_topology.get_slice("v4:4x4x8").name == "v4-256"
  assert tpu_topology.get_slice("v4-8").wraps == (False,) * 3
  assert tpu_topology.get_slice("v4-128").wraps == (True,) * 3
  with pytest.raises(ValueError, match="unknown TPU slice 'v5-8'.*v4-256"):
    tpu_topology.get_slice("v5-8")


def test_a_report_keeps_its_rows_and_this_machines_compiles_supersede_them(tmp_path):
  committed = json.loads((REPO / "results" / "paper_tpu_v4" / "compile_jobs.json").read_text())
  first, second = committed[0], committed[1]
  recompiled = dict(first, compile_seconds=first["compile_seconds"] + 1.0)
  (tmp_path / "one.json").write_text(json.dumps(recompiled))
  results = compile_lib.cached_results(str(tmp_path), earlier=[first, second])
  assert sorted(r.name for r in results) == sorted([first["name"], second["name"]])
  (again,) = [r for r in results if r.name == first["name"]]
  assert again.compile_seconds == recompiled["compile_seconds"]   # the newer compile wins


def test_the_committed_tpu_reports_are_redrawn_byte_for_byte_from_their_json(tmp_path):
  # compile_jobs.md, timing.md and fig6.png are written from what their JSON holds: the
  # committed reports come back unchanged (the writers run in CI without compiling anything).
  committed = REPO / "results" / "paper_tpu_v4"
  jobs = json.loads((committed / "compile_jobs.json").read_text())
  compile_lib.write_report(str(tmp_path), [compile_lib.CompiledJob.from_dict(j) for j in jobs])
  timing = json.loads((committed / "timing.json").read_text())
  tpu_timing.write(str(tmp_path), timing)
  for name in ("compile_jobs.md", "compile_jobs.json", "timing.md", "timing.json"):
    assert (tmp_path / name).read_bytes() == (committed / name).read_bytes(), name
  # The figure's pixels depend on matplotlib's version: its PNG header's width and height.
  header = lambda path: path.read_bytes()[16:24]
  assert header(tmp_path / "fig6.png") == header(committed / "fig6.png")
  # Every compiled decode step reads the bytes the performance model counts (K heads, never N).
  checks = tpu_timing.bytes_checks(timing)
  assert len(checks) == len(timing["rows"]) and all(c.startswith("PASS ") for c in checks)


def test_from_cache_with_nothing_compiled_is_an_error_and_no_cache_reads_no_folder(
    tmp_path, monkeypatch, capsys):
  empty = tmp_path / "cache"
  empty.mkdir()
  assert compile_lib.main(["--from-cache", "--cache-dir", str(empty)]) == 2
  assert "nothing compiled in --cache-dir" in capsys.readouterr().err
  # --cache-dir '' turns the cache off: the working directory's JSON files are not read.
  monkeypatch.chdir(tmp_path)
  (tmp_path / "unrelated.json").write_text("{}")
  assert compile_lib.cached_results("") == []


@pytest.mark.parametrize("message, needed", [
    ("RESOURCE_EXHAUSTED: XLA:TPU compile permanent error. Ran out of memory in memory space "
     "hbm. Used 78.73G of 30.75G hbm. Exceeded hbm capacity by 47.98G.", 78.73 * GIB),
    ("RESOURCE_EXHAUSTED: HLO temporaries (295.18G) exceeds available HBM (30.75G)",
     295.18 * GIB),
    ("RESOURCE_EXHAUSTED: something else", None),
])
def test_needed_bytes_are_read_from_the_compilers_error(message, needed):
  assert aot.needed_bytes_from_error(message) == pytest.approx(needed) if needed else (
      aot.needed_bytes_from_error(message) is None)


@pytest.mark.parametrize("peak_gib, fits, within", [(20.0, True, True), (29.0, True, False),
                                                    (31.0, False, False)])
def test_fit_verdict_against_hbm_and_headroom(peak_gib, fits, within):
  figures = aot.ProgramFigures(argument_bytes=peak_gib * GIB)
  verdict = aot.check_fits(figures, 30.75 * GIB, 0.9, what="job X",
                           remedies=["--gin.NUM_MICROBATCHES=2"])
  assert (verdict.fits, verdict.within_headroom) == (fits, within)
  assert verdict.text.startswith("job X")
  assert ("NUM_MICROBATCHES=2" in verdict.text) == (not within)


def test_a_program_the_compiler_refused_does_not_fit_and_says_how_much_it_needed():
  figures = aot.ProgramFigures(compiled=False, needed_bytes=78.73 * GIB, error="...")
  verdict = aot.check_fits(figures, 30.75 * GIB, what="GQA-8-XXL uptrain",
                           remedies=["--gin.REMAT_POLICY='minimal'"])
  assert not verdict.fits
  assert "78.73 GiB" in verdict.text and "REMAT_POLICY='minimal'" in verdict.text


def test_performance_model_orders_memory_settings_by_step_time():
  config = sizes.t5_1_1("xxl", num_kv_heads=8)
  step = lambda remat, micro: perf_model.train_step_seconds(
      config, batch=2048, input_length=512, target_length=114, chips=128, model_parallel=8,
      remat_policy=remat, num_microbatches=micro)
  assert step("none", 1) < step("minimal", 1) < step("full", 1)
  assert step("minimal", 1) < step("minimal", 8)
  # Full rematerialisation recomputes the forward: a third more compute.
  assert step("full", 1) / step("none", 1) == pytest.approx(4 / 3, rel=0.02)
  with pytest.raises(ValueError, match="remat_policy"):
    step("everything", 1)


def test_timing_batches_fit_the_compilers_hbm_within_the_headroom():
  # Each chip's weights and caches at the fitted batch fit 90% of the 30.75 GiB the compiler makes
  # available (not the chip's 32 GiB), and one sample more would not (unless capped at 32).
  setup = perf_model.Setup()
  budget = V4_AVAILABLE * tpu_topology.HEADROOM_FRACTION
  batches = {}
  for axis in tpu_timing.MODEL_AXES:
    for timed in tpu_timing.timed_models():
      b = tpu_timing.batch_per_chip(timed, axis, setup)
      config = tpu_timing.full_config(timed)
      timed_setup = tpu_timing.model_setup(timed, axis, setup)
      assert perf_model.memory_per_chip(config, timed_setup, b) <= budget
      assert (b == setup.max_batch_per_chip
              or perf_model.memory_per_chip(config, timed_setup, b + 1) > budget)
      batches[axis, timed.name] = b
  # MHA-XXL's caches are the ones that do not fit 32 per chip: 26 on a model axis of 8, 23 of 4
  # (31 and 28 within the whole 32 GiB); every other model runs 32.
  assert batches[8, "MHA-XXL"] == 26 and batches[4, "MHA-XXL"] == 23
  assert {b for (_, name), b in batches.items() if name != "MHA-XXL"} == {32}
  assert [v.name for v in tpu_timing.timed_models()] == [
      "MHA-Large", "MHA-XXL", "GQA-32-XXL", "GQA-16-XXL", "GQA-8-XXL", "GQA-4-XXL", "MQA-XXL"]


def test_every_paper_job_carries_a_memory_setting_and_the_models_are_scanned():
  for job in jobs_lib.build_jobs():
    if job.entry == "gqa_t5.train":
      assert {"REMAT_POLICY", "NUM_MICROBATCHES"} <= set(job.bindings), job.name
    assert all(f.startswith("paper/models/") for f in job.model.gin_files), job.name


def test_multi_head_xxl_fine_tuning_at_long_inputs_gets_its_own_memory_plan():
  # Compiled: GQA-8's plan ('minimal', 2 micro-batches) puts MHA-XXL at 2048/512 over the chip.
  plans = {job.name: (job.bindings["REMAT_POLICY"], job.bindings["NUM_MICROBATCHES"])
           for job in jobs_lib.build_jobs() if job.kind == "finetune"}
  assert plans["MHA-XXL finetune arxiv"] == ("minimal", 4)
  assert plans["GQA-8-XXL finetune arxiv"] == plans["MQA-XXL finetune arxiv"] == ("minimal", 2)
  assert plans["MHA-XXL finetune cnn_dailymail"] == plans["GQA-8-XXL finetune cnn_dailymail"]


def _program_of(scale):
  def step(x):
    return x * scale + 1.0
  return step


def _program_documented():
  def step(x):
    """The same program as _program_of(2.0), written on other source lines."""
    doubled = x * 2.0
    return doubled + 1.0
  return step


def test_compile_cache_key_is_the_lowered_program_not_its_source():
  x = jax.ShapeDtypeStruct((4,), jnp.float32)
  digest = lambda fn: aot.program_digest(jax.jit(fn).lower(x))
  assert digest(_program_of(2.0)) == digest(_program_documented())
  assert digest(_program_of(2.0)) != digest(_program_of(3.0))


def test_compiled_figures_are_cached_by_program(tmp_path, monkeypatch):
  x = jax.ShapeDtypeStruct((4,), jnp.float32)
  first = aot.compile_figures(jax.jit(_program_of(2.0)).lower(x), str(tmp_path), "cpu")
  assert first.compiled and len(list(tmp_path.iterdir())) == 1

  def no_compile(lowered):
    raise AssertionError("compiled again")
  monkeypatch.setattr(aot, "_compile_figures", no_compile)
  again = aot.compile_figures(jax.jit(_program_documented()).lower(x), str(tmp_path), "cpu")
  assert again == first
  with pytest.raises(AssertionError, match="compiled again"):  # another target: not the same
    aot.compile_figures(jax.jit(_program_of(2.0)).lower(x), str(tmp_path), "v4-8")


# ---- compiled for v4-8 with libtpu ---------------------------------------------------------

@pytest.fixture(scope="module")
def v4_8():
  return tpu_topology.slice_devices("v4-8")


def _cache_leaf(tree, path):
  for key in path:
    tree = tree[key]
  return tree


@needs_libtpu
def test_tiny_decode_steps_fit_and_lay_out_kv_heads_by_the_rules(v4_8):
  # Dimensions of whole TPU tiles (128 lanes), so that padding does not blur the bytes.
  setup = perf_model.Setup(input_length=256, output_length=128)
  step_bytes = {}
  for k in (8, 2, 1):
    config = sizes.t5_1_1("tiny", emb_dim=256, head_dim=128, mlp_dim=512, vocab_size=1024,
                          num_encoder_layers=1, num_decoder_layers=1, num_kv_heads=k,
                          num_cross_kv_heads=k, dropout_rate=0.0)
    lowered = tpu_timing.lower_programs(config, model_axis=2, batch=8, setup=setup,
                                        devices=v4_8)
    compiled = lowered["step"].compile()
    figures = aot.program_figures(compiled)
    assert aot.check_fits(figures, V4_AVAILABLE).within_headroom
    step_bytes[k] = figures.bytes_accessed
    cache = compiled.input_shardings[0][3]
    for attention in ("self_attention", "encoder_decoder_attention"):
      spec = _cache_leaf(cache, ("decoder", "layers_0", attention, "cached_key")).spec
      # [B, K, S, H]: batch over 'data'; K over 'model' only when K is a multiple of 2.
      assert spec[0] == "data"
      assert (spec[1] if len(spec) > 1 else None) == ("model" if k % 2 == 0 else None), (k, spec)
  # Fewer key/value heads, fewer bytes per step: nothing is repeated to N heads. K = 2 and
  # K = 1 both leave one key/value head per chip of a 2-way model axis (K = 1 replicated), so
  # their steps move the same bytes: why MQA gains less on a partitioned model.
  assert step_bytes[8] > 1.5 * step_bytes[2]
  assert step_bytes[2] == pytest.approx(step_bytes[1], rel=0.02)


@needs_libtpu
@pytest.mark.parametrize("k, model_axis", [(4, 4), (2, 4), (1, 4), (2, 2), (8, 4)])
def test_performance_model_cache_copies_match_the_partitioners_cache_shards(v4_8, k, model_axis):
  """The bytes of decoding caches one chip of a v4-8 slice holds under the partitioner's
  shardings (no compile: shapes and shardings alone) are what the performance model's
  'replicated' layout counts, K = 2 on a 4-way axis included (all 2 heads on every chip, 4
  copies of an even split, not 4 / 2)."""
  config = sizes.t5_1_1("tiny", num_kv_heads=k, num_cross_kv_heads=k, dropout_rate=0.0)  # N=8
  setup = perf_model.Setup(chips=4, model_parallel=model_axis, input_length=16, output_length=8,
                           kv_layout="replicated")
  batch = 8
  model = models.EncoderDecoderModel(network.Transformer(config))
  part = partitioning.Partitioner(data_parallel=-1, model_parallel=model_axis, devices=v4_8)
  params = aot.abstract_params(model, part)
  with part.mesh, part.axis_rules():
    shapes = jax.eval_shape(
        lambda p: model.init_cache(p, batch, setup.input_length, setup.output_length), params)
  shardings = part.shardings(t5x_compat.cache_logical_axes(shapes))
  per_chip = 0
  for path, leaf in jax.tree_util.tree_flatten_with_path(shapes)[0]:
    if path[-1].key in ("cached_key", "cached_value"):
      sharding = _cache_leaf(shardings, [p.key for p in path])
      assert leaf.dtype.itemsize == setup.bytes_per_value
      per_chip += np.prod(sharding.shard_shape(leaf.shape)) * leaf.dtype.itemsize
  batch_per_chip = batch // setup.chips
  model_bytes = (perf_model.memory_per_chip(config, setup, batch_per_chip)
                 - perf_model.memory_per_chip(config, setup, 0))
  assert per_chip == model_bytes
  copies = 1 if k % model_axis == 0 else model_axis
  assert perf_model.kv_cache_copies(config, setup) == copies


@needs_libtpu
def test_tiny_train_step_compiles_for_v4_8_and_the_dry_run_reports_the_fit(v4_8, capsys):
  config = sizes.t5_1_1("tiny", num_kv_heads=2, num_cross_kv_heads=2, dropout_rate=0.0)
  model = models.EncoderDecoderModel(network.Transformer(config))
  spec = {k: ((8, 16), np.int32) for k in ("encoder_input_tokens", "decoder_input_tokens",
                                            "decoder_target_tokens", "decoder_loss_weights")}
  part = partitioning.Partitioner(data_parallel=-1, model_parallel=2, devices=v4_8)
  step = trainer.Trainer(model, optim.Adafactor(learning_rate=schedules.rsqrt_decay()), part, spec)
  report = trainer.dry_run_report(step, V4_AVAILABLE, what="tiny")
  assert report["fits"] and 0 < report["peak_bytes_per_device"] < GIB
  assert "tiny fits" in capsys.readouterr().out
  kernel = step.params_shardings["decoder"]["layers_0"]["self_attention"]["key"]["kernel"]
  assert tuple(kernel.spec) == (None, "model")  # K = 2 over a model axis of 2: sharded


class _FakeCompiler:
  """Stands in for JobCompiler: temporaries shrink with micro-batches as a real step's do."""

  def __init__(self, temps_gib):
    self.temps_gib = temps_gib  # remat -> temporaries at one micro-batch (None: refused)
    self.tried = []

  def compile(self, job):
    remat = job.bindings["REMAT_POLICY"]
    micro = job.bindings["NUM_MICROBATCHES"] or 1
    self.tried.append((remat, micro))
    temps = self.temps_gib[remat] * GIB / micro + 2 * GIB
    figures = aot.ProgramFigures(argument_bytes=4 * GIB, temp_bytes=temps)
    if temps + 4 * GIB > V4_AVAILABLE:
      figures = aot.ProgramFigures(compiled=False, needed_bytes=temps)
    verdict = aot.check_fits(figures, V4_AVAILABLE)
    settings = {"batch": 2048, "lengths": {"inputs": 512, "targets": 114},
                "scan_layers": True, "remat_policy": remat, "num_microbatches": micro}
    return compile_lib.CompiledJob(job.name, job.kind, job.task, "v4-256",
                                   {"data": 16, "model": 8}, settings, figures,
                                   verdict.within_headroom, verdict.text, 0.0)


def test_search_takes_the_fastest_setting_that_fits_and_skips_hopeless_ones():
  job = next(j for j in jobs_lib.build_jobs() if j.name == "GQA-8-XXL uptrain")
  fake = _FakeCompiler({"none": 290.0, "minimal": 60.0, "full": 30.0})
  result = compile_lib.search(job, fake, log=lambda _: None)
  assert result.fits
  # Tried in the performance model's order, never a setting the failures already rule out:
  # 'none' needs 290 GiB at one micro-batch, so 'none' with 2..8 is never compiled.
  assert fake.tried[:2] == [("none", 1), ("minimal", 1)]
  assert ("none", 2) not in fake.tried and ("minimal", 2) not in fake.tried
  remat, micro = fake.tried[-1]
  assert (result.settings["remat_policy"], result.settings["num_microbatches"]) == (remat, micro)


def test_job_selection_by_pattern_names_the_jobs_when_nothing_matches():
  jobs = jobs_lib.build_jobs()
  assert [j.name for j in compile_lib.select(jobs, "GQA-8-XXL uptrain")] == ["GQA-8-XXL uptrain"]
  assert len(compile_lib.select(jobs, "*XXL eval*")) == 21
  with pytest.raises(ValueError, match="matches no job.*MHA-Large finetune cnn_dailymail"):
    compile_lib.select(jobs, "GQA-9")
