"""The one performance model (gqa_t5/perf_model.py): its counts against the network's parameter
and cache trees, its roofline against hand-computed bytes, FLOPs and times, and the chip table
as the one source of the chips' figures."""

import dataclasses

import jax
import numpy as np
import pytest
from flax import traverse_util

from gqa_t5 import partitioning
from gqa_t5 import perf_model
from gqa_t5 import tpu_topology
from gqa_t5.benchmarks import train as train_benchmark
from gqa_t5.model import Transformer, grouping, sizes
from gqa_t5.model.config import T5Config
from gqa_t5.models import EncoderDecoderModel
from gqa_t5.reproduce.paper_scale import timing_sim
from gqa_t5.reproduce.pipeline import estimate
from gqa_t5.reproduce.report import paper
from tests.tiny_configs import tiny_config

# D=4, N=2 heads of H=3, MLP 5, 1 encoder and 2 decoder layers, vocabulary 7, MQA (K=1), one
# relative-position bucket (a bias of N=2 values per stack).
TINY = T5Config(vocab_size=7, emb_dim=4, num_heads=2, head_dim=3, mlp_dim=5, num_encoder_layers=1,
                num_decoder_layers=2, num_kv_heads=1, relative_attention_num_buckets=1)
CHIP = perf_model.Chip("toy", hbm_bytes_per_s=1000.0, peak_flops=1e4, hbm_bytes=3000.0)
SETUP = perf_model.Setup(chips=1, model_parallel=1, max_batch_per_chip=32, input_length=10,
                         output_length=6, bytes_per_value=2)


# ---- against the network's trees ---------------------------------------------------------------

def _abstract_params(config):
  return partitioning.abstract_params_and_axes(EncoderDecoderModel(Transformer(config)))[0]


def _part(path, config) -> str:
  """The `perf_model.params` key of a parameter, by its path."""
  if path[0] == "token_embedder":
    return "decoder_step" if config.logits_via_embedding else "embedding"
  if path[0] == "encoder":
    return "encoder"
  if "encoder_decoder_attention" in path and path[-2] in ("key", "value"):
    return "cross_kv"
  return "decoder_step"


@pytest.mark.parametrize("overrides", [
    {},
    {"num_kv_heads": 2, "num_cross_kv_heads": 4, "num_decoder_layers": 3},
    {"num_kv_heads": 1, "logits_via_embedding": True},
    {"num_kv_heads": 2, "scan_layers": True},
])
def test_parameter_counts_are_the_networks(overrides):
  config = sizes.t5_1_1("tiny", **overrides)
  counts = {"encoder": 0, "decoder_step": 0, "cross_kv": 0, "embedding": 0}
  matmul = dict(counts)
  for path, value in traverse_util.flatten_dict(_abstract_params(config)).items():
    size = int(np.prod(value.shape))
    counts[_part(path, config)] += size
    if path[-1] == "kernel" or (path[0] == "token_embedder" and config.logits_via_embedding):
      matmul[_part(path, config)] += size
  assert perf_model.params(config) == counts
  assert perf_model.matmul_params(config) == matmul
  assert perf_model.total_params(config) == sum(counts.values())


def _tree_bytes(tree, keep=lambda path: True):
  flat = traverse_util.flatten_dict(tree)
  return sum(int(np.prod(v.shape)) * np.dtype(v.dtype).itemsize
             for k, v in flat.items() if keep(k))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_step_bytes_equal_the_parameter_and_cache_trees(dtype):
  config = sizes.t5_1_1("tiny", dtype=dtype, num_kv_heads=2, num_cross_kv_heads=4,
                        num_decoder_layers=3)
  model = EncoderDecoderModel(Transformer(config))
  abstract = _abstract_params(config)
  b, s, t = 3, 11, 5
  cache = jax.eval_shape(lambda p: model.init_cache(p, b, s, t), abstract)
  # Independently: every decoder parameter but the cross-attention key/value kernels, at the
  # activation dtype (as the decode benchmark stores them), and every cached key/value array.
  itemsize = np.dtype(dtype).itemsize
  weights = sum(int(np.prod(v.shape)) for k, v in traverse_util.flatten_dict(
      abstract["decoder"]).items()
                if not (len(k) > 2 and k[1] == "encoder_decoder_attention"
                        and k[2] in ("key", "value")))
  self_cache = _tree_bytes(cache, lambda k: k[-2] == "self_attention" and k[-1].startswith(
      "cached_"))
  cross_kv = _tree_bytes(cache, lambda k: k[-2] == "encoder_decoder_attention"
                         and k[-1].startswith("cached_"))
  got = perf_model.decode_step_bytes(config, b, s, t)
  assert got == {"weights": weights * itemsize, "self_cache": self_cache, "cross_kv": cross_kv,
                 "total": weights * itemsize + self_cache + cross_kv}
  caches = perf_model.cache_bytes(config, s, t)
  assert (b * caches["self_cache"], b * caches["cross_kv"]) == (self_cache, cross_kv)


# ---- by hand -----------------------------------------------------------------------------------

def test_parameter_counts_by_hand():
  # MHA attention: q, k, v [4, 6] and out [6, 4] = 4 * 24; with K=1, k and v are [4, 3].
  assert sum(perf_model.attention_params(TINY, 2).values()) == 96
  assert sum(perf_model.attention_params(TINY, 1).values()) == 72
  assert perf_model.mlp_params(TINY) == 3 * 4 * 5
  # Per decoder layer: self-attention 72 + cross query/out 48 + MLP 60; plus logits 4 x 7.
  assert perf_model.matmul_params(TINY) == {"encoder": 96 + 60, "decoder_step": 2 * 180 + 28,
                                            "cross_kv": 2 * (12 + 12), "embedding": 0}
  # Norm scales (2 per encoder layer, 3 per decoder layer, 1 per stack) and the N x 1 biases.
  assert perf_model.params(TINY) == {"encoder": 156 + 12 + 2, "decoder_step": 388 + 28 + 2,
                                     "cross_kv": 48, "embedding": 28}
  assert perf_model.total_params(TINY) == 170 + 418 + 48 + 28


def test_cache_bytes_by_hand():
  # 2 (key and value) * K=1 * H=3 * 2 bytes * 2 layers = 24 bytes per position.
  assert perf_model.cache_bytes(TINY, 10, 6, SETUP.bytes_per_value) == {
      "self_cache": 24 * 6, "cross_kv": 24 * 10}
  # At the activation dtype (float32) by default.
  assert perf_model.cache_bytes(TINY, 10, 6)["self_cache"] == 48 * 6


def test_decode_step_by_hand():
  step = perf_model.decode_step(TINY, SETUP, CHIP, batch_per_chip=4)
  assert step["weights_bytes"] == 418 * 2
  assert step["self_cache_bytes"] == 4 * 144
  assert step["cross_kv_bytes"] == 4 * 240
  assert step["bytes"] == 836 + 576 + 960
  # FLOPs per sample: 2 per matmul weight (776) + QK and AV over 6 + 10 positions: 4 * 6 * 2 * 16.
  assert step["flops"] == 4 * (776 + 768)
  assert step["memory_time"] == pytest.approx(2.372)
  assert step["compute_time"] == pytest.approx(0.6176)
  assert step["memory_bound"] and step["time"] == pytest.approx(2.372)


def test_time_per_sample_by_hand():
  r = perf_model.time_per_sample(TINY, SETUP, CHIP, batch_per_chip=4)
  # Encoder: 2 * 156 * 10 + attention 4 * 6 * 10 * 10; prefill 2 * 48 * 10; batch of 4.
  assert r["encode"] == pytest.approx(4 * (3120 + 2400 + 960) / 1e4 / 4)
  assert r["decode"] == pytest.approx(6 * 2.372 / 4)
  assert r["total"] == pytest.approx(r["encode"] + r["decode"])
  shares = r["decode_weights"] + r["decode_self_cache"] + r["decode_cross_kv"]
  assert shares == pytest.approx(r["decode"])
  assert r["decode_cross_kv"] == pytest.approx(6 * 960 / 4 / 1000)


def test_the_batch_is_the_largest_that_fits():
  # Weights 664 * 2 = 1328 bytes + 384 bytes of caches per sample within 3000 bytes: 4.
  assert perf_model.memory_per_chip(TINY, SETUP, 4) == 1328 + 4 * 384
  assert perf_model.fitting_batch_per_chip(TINY, SETUP, CHIP) == 4
  # Within a memory given instead of the chip's HBM: 1328 + 2 * 384 = 2096 <= 2100.
  assert perf_model.fitting_batch_per_chip(TINY, SETUP, CHIP, memory_bytes=2100.0) == 2
  capped = dataclasses.replace(SETUP, max_batch_per_chip=3)
  assert perf_model.fitting_batch_per_chip(TINY, capped, CHIP) == 3
  small = perf_model.Chip("small", 1.0, 1.0, hbm_bytes=1000.0)
  with pytest.raises(ValueError, match="not even one sample fits"):
    perf_model.fitting_batch_per_chip(TINY, SETUP, small)


def test_fit_batch_rounds_down_and_names_what_does_not_fit():
  gib = 2 ** 30
  assert perf_model.fit_batch(gib, 20 * gib, 140 * gib, usable_fraction=0.8, multiple=8) == 96
  assert perf_model.fit_batch(gib, 0, 5 * gib, multiple=8) == 5
  assert perf_model.fit_batch(gib, 0, 50 * gib, max_batch=32) == 32
  with pytest.raises(ValueError, match="one sequence needs 4.00 GiB"):
    perf_model.fit_batch(4 * gib, 9 * gib, 10 * gib, usable_fraction=0.8)


def test_self_cache_read_and_kv_layout_options():
  filled = dataclasses.replace(SETUP, self_cache_read="filled")
  step = perf_model.decode_step(TINY, filled, CHIP, 4)
  assert step["self_cache_bytes"] == pytest.approx(4 * 144 * 3.5 / 6)
  replicated = dataclasses.replace(SETUP, model_parallel=2, kv_layout="replicated")
  step = perf_model.decode_step(TINY, replicated, CHIP, 4)
  assert step["cross_kv_bytes"] == 2 * 4 * 240  # K=1 held whole on both model shards
  assert step["weights_bytes"] == 418  # weights split over the 2 chips
  # Self-attention K=1, cross-attention K=2: one logical axis serves both, so the partitioner
  # replicates both (K=2 alone would split over the 2 chips): both caches count 2 copies.
  step = perf_model.decode_step(TINY.replace(num_cross_kv_heads=2), replicated, CHIP, 4)
  assert step["self_cache_bytes"] == 2 * 4 * 144 and step["cross_kv_bytes"] == 2 * 4 * 480
  # Both K=2: split over the 2 chips, one copy as in the 'ideal' layout.
  step = perf_model.decode_step(TINY.replace(num_kv_heads=2), replicated, CHIP, 4)
  assert step["self_cache_bytes"] == 4 * 288 and step["cross_kv_bytes"] == 4 * 480
  with pytest.raises(ValueError, match="kv_layout"):
    perf_model.decode_step(TINY, perf_model.Setup(kv_layout="bogus"), CHIP, 4)


@pytest.mark.parametrize("k, model_parallel, copies", [
    (4, 8, 8),    # K=4 on an 8-way axis: all 4 heads on every chip (not 8 / 4 = 2 copies)
    (1, 8, 8), (2, 4, 4), (16, 8, 1), (64, 8, 1), (8, 8, 1),
    (8, 16, 16),  # K=8 on a 16-way axis: all 8 heads on every chip
])
def test_replicated_layout_holds_all_k_heads_on_every_chip_unless_they_split(
    k, model_parallel, copies):
  """The 'replicated' layout is the partitioner's: K heads split over the model axis when K is
  a multiple of it, else every chip holds them all (model_parallel copies of an even split)."""
  config = sizes.t5_1_1("xxl", num_kv_heads=k)  # N = 64
  setup = perf_model.Setup(chips=16, model_parallel=model_parallel, kv_layout="replicated")
  assert perf_model.kv_cache_copies(config, setup) == copies
  # The same verdict as the partitioner's rules table for these K and model axis.
  rules = dict(partitioning.standard_logical_axis_rules(k, k, model_parallel))
  assert (rules["kv_heads"] == "model") == (copies == 1)
  # A chip's memory and step bytes count every copy of both caches.
  ideal = dataclasses.replace(setup, kv_layout="ideal")
  caches = sum(perf_model.cache_bytes(config, setup.input_length, setup.output_length).values())
  extra = (perf_model.memory_per_chip(config, setup, 3)
           - perf_model.memory_per_chip(config, ideal, 3))
  assert extra == 3 * (copies - 1) * caches
  step = perf_model.decode_step(config, setup, perf_model.TPU_V4, 3)
  step_ideal = perf_model.decode_step(config, ideal, perf_model.TPU_V4, 3)
  assert step["bytes"] - step_ideal["bytes"] == 3 * (copies - 1) * caches
  assert perf_model.kv_cache_copies(config, ideal) == 1


def test_train_step_by_hand():
  forward = perf_model.train_forward_flops(TINY, input_length=10, target_length=6)
  # Matmuls: 2 * ((156 + 48) * 10 + 388 * 6); attention: 4 * 6 * (1 * 100 + 2 * (36 + 60)).
  assert forward == {"matmul": 2.0 * (204 * 10 + 388 * 6), "attention": 24.0 * (100 + 192)}
  seconds = perf_model.train_step_seconds(TINY, batch=2, input_length=10, target_length=6,
                                          chips=1, model_parallel=1, num_microbatches=2,
                                          chip=CHIP)
  # Forward + backward at 1e4 FLOP/s, and one extra read of 664 float32 weights both ways.
  assert seconds == pytest.approx(2 * 3 * sum(forward.values()) / 1e4 + 2 * 4 * 664 / 1000)
  # The step's FLOPs: backward twice the forward; rematerialisation adds what it recomputes.
  flops = {policy: perf_model.train_step_flops(TINY, batch=2, input_length=10, target_length=6,
                                               remat_policy=policy)
           for policy in ("none", "minimal", "full")}
  assert flops == {"none": 2 * 3 * sum(forward.values()),
                   "minimal": 2 * (3 * sum(forward.values()) + forward["attention"]),
                   "full": 2 * 4 * sum(forward.values())}
  with pytest.raises(ValueError, match="remat_policy"):
    perf_model.train_step_flops(TINY, batch=2, input_length=10, target_length=6,
                                remat_policy="some")


@pytest.mark.parametrize("num_kv_heads", [None, 2])
def test_train_step_flops_match_xla_cpu_count_of_our_step(num_kv_heads):
  # The training benchmark's MFU divides the model's FLOPs (perf_model) by the step time, not
  # XLA's count (which on a GPU came out at a fifth of them). On a CPU XLA counts every dot, so
  # the two agree there, up to the element-wise work (norms, softmax, Adafactor) the model
  # leaves out: a few percent at these sizes.
  config = tiny_config("t5x_fixture", num_kv_heads, dtype="bfloat16")
  batch = train_benchmark.synthetic_batch(2, (64, 32), config.vocab_size)
  step = train_benchmark.GqaTrainStep(config, num_kv_heads or config.num_heads, batch)
  step.compiled = step.lowered.compile()
  model = perf_model.train_step_flops(config, batch=2, input_length=64, target_length=32)
  assert 1.0 <= step.xla_flops() / model < 1.15


# ---- one copy of each fact ---------------------------------------------------------------------

def test_the_chip_table_is_where_every_chip_figure_comes_from(monkeypatch):
  v4, h200 = perf_model.TPU_V4, perf_model.H200
  # TPU v4: the compiler's available HBM is the slices' and the dry run's budget.
  assert v4.available_bytes == 30.75 * 2 ** 30 and v4.hbm_bytes == 32 * 2 ** 30
  assert {s.hbm_bytes for s in tpu_topology.SLICES.values()} == {v4.available_bytes}
  # The simulation runs on the table's TPU v4; the stage estimates on its H200.
  assert timing_sim.simulate(perf_model.Setup())["chip"] == dataclasses.asdict(v4)
  machine = estimate.MACHINES["h200"]
  assert (machine.peak_flops, machine.hbm_bytes_per_s) == (h200.peak_flops, h200.hbm_bytes_per_s)
  # The training benchmark's MFU peak is the table's, found by JAX's device kind.
  for kind, chip in (("NVIDIA H200", h200), ("NVIDIA H100 80GB HBM3", perf_model.H100),
                     ("TPU v4", v4), ("cpu", None)):
    assert perf_model.chip_of_device_kind(kind) is chip
    fake = type("Device", (), {"device_kind": kind})()
    monkeypatch.setattr(train_benchmark.jax, "devices", lambda fake=fake: [fake])
    expected = None if chip is None else chip.peak_flops / 1e12
    assert train_benchmark.peak_tflops(None) == expected
  assert train_benchmark.peak_tflops(100.0) == 100.0


def test_table1_names_and_times_come_from_the_papers_table():
  configs = paper.table1_configs()
  assert list(configs) == list(paper.TABLE1)
  # Each name is what model_name spells for its size and key/value heads.
  for name, config in configs.items():
    row = paper.TABLE1[name]
    assert config.num_kv_heads == row["kv_heads"]
    assert paper.model_name(row["size"], config.num_kv_heads, config.num_heads) == name
  assert paper.xxl_seconds() == {1: 0.24, 8: 0.28, 64: 1.51}
  assert paper.table1_seconds() == {name: row["time"] for name, row in paper.TABLE1.items()}
  assert paper.model_name("xxl", 8, 64) == "GQA-8-XXL"
  assert paper.model_name("large", None, 16) == "MHA-Large"


def test_kv_labels_and_valid_counts():
  assert grouping.valid_kv_heads(64) == [1, 2, 4, 8, 16, 32, 64]
  assert [grouping.kv_label(k, 8) for k in (8, None, 1, 2)] == ["MHA", "MHA", "MQA", "GQA-2"]
  assert [grouping.kv_name(k, 8) for k in (8, 1, 4)] == ["mha", "mqa", "gqa4"]
