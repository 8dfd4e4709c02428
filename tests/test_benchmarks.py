"""The benchmarks: roofline byte counts, the GQA weights they time, their TF-free imports, and
their smoke modes end to end through scripts/gpu_check.sh --smoke (JSON figures and checks)."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import traverse_util

from gqa_t5 import partitioning
from gqa_t5.benchmarks import convert, decode_run, roofline
from gqa_t5.model import Transformer, sizes
from gqa_t5.models import EncoderDecoderModel

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _tree_bytes(tree, keep=lambda path: True):
  flat = traverse_util.flatten_dict(tree)
  return sum(int(np.prod(v.shape)) * np.dtype(v.dtype).itemsize
             for k, v in flat.items() if keep(k))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_step_bytes_equal_the_parameter_and_cache_trees(dtype):
  config = sizes.t5_1_1("tiny", dtype=dtype, num_kv_heads=2, num_cross_kv_heads=4,
                        num_decoder_layers=3)
  model = EncoderDecoderModel(Transformer(config))
  abstract, _ = partitioning.abstract_params_and_axes(model)
  b, s, t = 3, 11, 5
  cache = jax.eval_shape(lambda p: model.init_cache(p, b, s, t), abstract)
  # Independently: every decoder parameter but the cross-attention key/value kernels, at the
  # activation dtype (as the benchmark stores them), and every cached key/value array.
  itemsize = np.dtype(dtype).itemsize
  weights = sum(int(np.prod(v.shape)) for k, v in traverse_util.flatten_dict(
      abstract["decoder"]).items()
                if not (len(k) > 2 and k[1] == "encoder_decoder_attention"
                        and k[2] in ("key", "value")))
  self_cache = _tree_bytes(cache, lambda k: k[-2] == "self_attention" and k[-1].startswith(
      "cached_"))
  cross_kv = _tree_bytes(cache, lambda k: k[-2] == "encoder_decoder_attention"
                         and k[-1].startswith("cached_"))
  got = roofline.decode_step_bytes(config, b, s, t)
  assert got == {"weights": weights * itemsize, "self_cache": self_cache, "cross_kv": cross_kv,
                 "total": weights * itemsize + self_cache + cross_kv}
  assert roofline.cache_bytes_per_sequence(config, s, t) * b == self_cache + cross_kv


def test_gqa_weights_are_the_mean_pooled_mha_weights_and_share_the_rest():
  config = sizes.t5_1_1("tiny", dtype="float32", num_decoder_layers=1)
  mha = decode_run.init_mha_params(config)
  np.testing.assert_array_equal(mha["decoder"]["logits_dense"]["kernel"],
                                np.asarray(mha["token_embedder"]["embedding"]).T)
  gqa = decode_run.pool_kv_heads(mha, config, 2)
  kernel = np.asarray(mha["decoder"]["layers_0"]["self_attention"]["key"]["kernel"])  # [D, N*H]
  d, n, h = config.emb_dim, config.num_heads, config.head_dim
  expected = kernel.reshape(d, 2, n // 2, h).mean(axis=2).reshape(d, 2 * h)
  np.testing.assert_allclose(gqa["decoder"]["layers_0"]["self_attention"]["key"]["kernel"],
                             expected, rtol=1e-6)
  assert gqa["encoder"] is mha["encoder"]
  assert (gqa["decoder"]["layers_0"]["mlp"] is mha["decoder"]["layers_0"]["mlp"])
  assert (gqa["decoder"]["layers_0"]["self_attention"]["query"]
          is mha["decoder"]["layers_0"]["self_attention"]["query"])


def test_fit_batch_rounds_down_and_names_what_does_not_fit():
  gib = 2 ** 30
  assert roofline.fit_batch(gib, 20 * gib, 140 * gib, usable_fraction=0.8) == 96
  assert roofline.fit_batch(gib, 0, 5 * gib, usable_fraction=1.0) == 5
  with pytest.raises(ValueError, match="one sequence needs 4.00 GiB"):
    roofline.fit_batch(4 * gib, 9 * gib, 10 * gib)


def test_benchmarks_import_without_tensorflow_seqio_or_gin():
  code = (
      "import sys\n"
      "for name in ('tensorflow', 'seqio', 'gin', 't5x'):\n"
      "  sys.modules[name] = None\n"
      "import gqa_t5.cli\n"
      "from gqa_t5.benchmarks import common, convert, decode, decode_report, decode_run\n"
      "from gqa_t5.benchmarks import hf_reference, roofline, train\n"
      "decode.build_config(*decode.parse_args(['--shape', 'XXL']))\n"
      "train.parse_args(['--smoke'])\n"
      "print('imported')\n")
  done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                        cwd=REPO, check=False)
  assert done.returncode == 0, done.stderr[-3000:]
  assert done.stdout.strip().endswith("imported")


def test_convert_smoke_writes_its_figures_and_check(tmp_path):
  path = tmp_path / "convert.json"
  assert convert.main(["--smoke", "--workdir", str(tmp_path / "work"), "--json", str(path)]) == 0
  result = json.loads(path.read_text())
  assert result["size"] == "tiny" and result["kv_heads"] == 2
  assert result["peak_rss_bytes"] > 0 and result["mib_per_s"] > 0
  assert [c["name"] for c in result["checks"]] == [
      "converter peak RSS <= 3 x largest tensor + 1 GiB"]
  assert result["checks"][0]["passed"]
  assert os.listdir(tmp_path / "work") == []


@pytest.fixture(scope="module")
def gpu_check_smoke(tmp_path_factory):
  out = tmp_path_factory.mktemp("gpu_check")
  env = dict(os.environ, OUT=str(out), PYTHON=sys.executable)
  done = subprocess.run(["bash", os.path.join(REPO, "scripts", "gpu_check.sh"), "--smoke"],
                        cwd=REPO, env=env, capture_output=True, text=True, timeout=3600,
                        check=False)  # a hang guard: the steps' own limits are 600 s each
  assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
  return out, done.stdout


def _load(out, name):
  return json.loads((out / name).read_text())


def test_gpu_check_smoke_summary_has_every_section(gpu_check_smoke):
  out, stdout = gpu_check_smoke
  summary = _load(out, "summary.json")
  assert summary["smoke"] is True
  assert set(summary) >= {"steps", "tests", "startup", "decode", "train", "all_checks_passed"}
  assert {name: s["rc"] for name, s in summary["steps"].items()} == {
      "tests": 0, "decode_L": 0, "startup_L_warm": 0, "decode_XXL": 0, "train": 0}
  assert "collected" in summary["tests"]["result"]
  startup = summary["startup"]
  assert all(startup[k] > 0 for k in ("L_cold_s", "L_warm_s", "XXL_cold_s"))
  assert summary["decode"]["L"]["per_k"] and summary["decode"]["XXL"]["per_k"]
  assert [o["name"] for o in summary["train"]["ours"]] == ["MHA", "MQA"]
  assert "gpu_check summary" in stdout and "Some donated buffers" not in stdout


def test_decode_smoke_json_has_figures_checks_and_hf(gpu_check_smoke):
  out, _ = gpu_check_smoke
  result = _load(out, "decode_L.json")
  assert result["smoke"] and result["run"]["kv_heads"] == [8, 2, 1]
  assert not result["startup"]["cache_warm"]
  assert result["startup"]["process_start_to_first_timed_step_s"] > 0
  for row in result["per_k"]:
    assert set(row) >= {"kv_heads", "step_ms_min", "step_ms_median", "bytes_per_step",
                        "roofline_fraction", "speedup_vs_mha", "ideal_speedup"}
    assert row["step_ms_min"] > 0 and row["bytes_per_step"]["total"] > 0
  names = [c["name"] for c in result["checks"]]
  assert names[:4] == ["start-up <= 120 s (cold compilation cache, shape smoke)",
                       "MHA decode step >= 0.5 of the memory roofline",
                       "every GQA/MQA speed-up >= 70% of its ideal byte ratio",
                       "step time never rises as K falls (3% tolerance)"]
  hf = result["hf"]
  if "skipped" in hf:
    assert "torch" in hf["skipped"]
  else:
    assert names[4].startswith("ours >= 5x faster per decode step than HF")
    assert hf["device"] == "cpu" and hf["step_ms"] > 0
    assert hf["token_agreement"] == 1.0  # float32, the same weights: the same greedy tokens
  warm = _load(out, "startup_L_warm.json")
  assert warm["startup"]["cache_warm"] and "per_k" not in warm
  xxl = _load(out, "decode_XXL.json")
  assert (xxl["run"]["output_length"], xxl["run"]["timed_steps"]) == (16, 4)


def test_train_smoke_json_has_mfu_checks_and_hf(gpu_check_smoke):
  out, _ = gpu_check_smoke
  result = _load(out, "train.json")
  assert result["peak_tflops"] == 1.0
  for row in result["ours"]:
    assert row["step_s"] > 0 and row["tokens_per_s"] > 0
    assert row["flops_per_step"] > 0 and 0 < row["mfu"] < 1
  names = [c["name"] for c in result["checks"]]
  assert names[:2] == ["GQA/MQA train no slower than MHA (3% tolerance)", "MFU >= 45%"]
  if result["hf"] and "skipped" not in result["hf"]:
    assert names[2] == "ours >= 1.5x HF transformers' tokens/s"
    assert result["hf"]["step_s"] > 0
