"""`gqa-t5 reproduce --preset paper --dry-run` on a few of its jobs: gin files, shapes, the
conversion of the public checkpoint, shardings on a TPU v4 mesh, decode caches, commands."""

import dataclasses
import json

import pytest

from gqa_t5 import partitioning
from gqa_t5.model.config import T5Config
from gqa_t5.reproduce.paper_scale import checks
from gqa_t5.reproduce.paper_scale import dry_run
from gqa_t5.reproduce.paper_scale import jobs as jobs_lib
from gqa_t5.reproduce.paper_scale import tpu_timing
from gqa_t5.reproduce.pipeline import variants


def large_gqa8_jobs():
  return [j for j in jobs_lib.build_jobs()
          if (j.model.size, j.model.attention) == ("large", "gqa8")
          and j.task in ("c4_span_corruption", "cnn_dailymail")]


def test_every_paper_job_is_planned():
  jobs = jobs_lib.build_jobs()
  # 6 models x 7 tasks x (fine-tune + eval), plus uptraining for the 4 grouped models.
  assert len(jobs) == 6 * 7 * 2 + 4
  names = {j.model.name for j in jobs}
  assert names == {"MHA-Large", "MQA-Large", "GQA-8-Large", "MHA-XXL", "MQA-XXL", "GQA-8-XXL"}
  uptrain = [j for j in jobs if j.kind == "uptrain"]
  assert all(j.bindings["TRAIN_STEPS"] == 1_050_000 and j.bindings["BATCH_SIZE"] == 2048
             for j in uptrain)
  mha_xxl = [j for j in jobs if j.model.name == "MHA-XXL" and j.kind == "finetune"]
  assert all(j.bindings["INITIAL_CHECKPOINT_PATH"] == jobs_lib.PUBLIC_CHECKPOINTS["xxl"]
             for j in mha_xxl)


def test_dry_run_checks_a_paper_model(tmp_path):
  jobs = large_gqa8_jobs()
  assert [j.kind for j in jobs] == ["uptrain", "finetune", "eval"]
  lines = []
  assert dry_run.dry_run(out=str(tmp_path), log=lines.append, jobs=jobs) == 0
  text = "\n".join(lines)
  assert "558 tensors of the public checkpoint, 96 mean-pooled to K=8" in text
  assert "decode cache at input 2048 / output 512: 120.0 MiB per sample" in text
  assert "v4-64 mesh data=32 x model=1" in text
  assert "3 of 3 paper-scale jobs check out" in text
  commands = (tmp_path / "paper_commands.sh").read_text()
  assert ("--gin.INITIAL_CHECKPOINT_PATH=\"'gs://t5-data/pretrained_models/t5x/t5_1_1_large/"
          "checkpoint_1000000'\"") in commands
  assert "--gin_file=paper/finetune/cnn_dailymail.gin" in commands
  assert "--gin.TRAIN_STEPS=\"1050000\"" in commands
  summary = json.loads((tmp_path / "paper_dry_run.json").read_text())
  assert summary["failures"] == []
  uptrain = summary["jobs"][0]
  # Large GQA-8 parameters: float32, replicated on a data-only mesh (about 2.9 GB).
  assert 2.5e9 < uptrain["bytes_per_chip"]["params"] < 3.1e9


def test_dry_run_names_what_would_fail(tmp_path):
  uptrain, finetune, evaluate = large_gqa8_jobs()
  bad_mesh = dataclasses.replace(uptrain, bindings={**uptrain.bindings, "MODEL_PARALLEL": 3},
                                 checks=[])
  bad_lengths = dataclasses.replace(
      evaluate, bindings={**evaluate.bindings,
                          "TASK_FEATURE_LENGTHS": {"inputs": 128, "targets": 16}}, checks=[])
  bad_file = dataclasses.replace(finetune, gin_files=finetune.gin_files[:1]
                                 + ("paper/finetune/nonexistent.gin",), checks=[])
  lines = []
  assert dry_run.dry_run(log=lines.append, jobs=[bad_mesh, bad_lengths, bad_file]) == 2
  failures = [line for line in lines if "FAIL" in line]
  assert len(failures) == 3
  assert "MODEL_PARALLEL=3" in failures[0]
  assert "the paper's are {'inputs': 512, 'targets': 256}" in failures[1]
  assert "nonexistent.gin" in failures[2]
  assert "0 of 3 paper-scale jobs check out" in lines[-1]


def test_a_checkpoint_that_does_not_fit_is_reported():
  """The public Large checkpoint, pooled to K=8, against a model of other dimensions."""
  config = T5Config(vocab_size=32128, emb_dim=64, num_heads=4, head_dim=16, mlp_dim=128,
                    num_encoder_layers=24, num_decoder_layers=24, num_kv_heads=2)
  params, _ = partitioning.abstract_params_and_axes(variants.make_model(config))
  spec = jobs_lib.ModelSpec("large", "gqa8", 8, (), jobs_lib.LARGE_SLICE)
  with pytest.raises(checks.DryRunError, match="does not match the configured model"):
    checks.check_conversion(spec, config.replace(emb_dim=1024, num_heads=16, head_dim=64,
                                                      mlp_dim=2816, num_kv_heads=8), params)


def test_timing_runs_add_rows_to_the_committed_ones(tmp_path):
  setup, chip = {"chips": 8}, {"name": "v4"}
  row = lambda name, axis, v: {"name": name, "model_axis": axis, "value": v}
  earlier = {"setup": setup, "chip": chip,
             "rows": [row("MHA-Large", 8, 1), row("MQA-XXL", 8, 2), row("MHA-XXL", 8, 3)]}
  new = {"setup": setup, "chip": chip, "rows": [row("MQA-XXL", 4, 4), row("MQA-XXL", 8, 5)]}
  rows = tpu_timing.merged(earlier, new)["rows"]
  # Redone rows replaced, others kept; by model axis, then in the paper's variant order.
  assert [(r["name"], r["model_axis"], r["value"]) for r in rows] == [
      ("MQA-XXL", 4, 4), ("MHA-Large", 8, 1), ("MHA-XXL", 8, 3), ("MQA-XXL", 8, 5)]
  # Another set-up: nothing is kept from the earlier run.
  assert tpu_timing.merged({**earlier, "setup": {"chips": 4}}, new) == new
