"""Smoke tests of scripts/conversion_quality.py and scripts/benchmark_convert.py on tiny inputs."""

import importlib.util
import os
import re

import pytest

import fixture_paths

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURE = fixture_paths.T5X_TINY


def _script(name):
  spec = importlib.util.spec_from_file_location(name, os.path.join(REPO, "scripts", f"{name}.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_conversion_quality_on_the_fixture(capsys):
  script = _script("conversion_quality")
  assert script.main(["--checkpoint", os.path.join(FIXTURE, "checkpoint_f32", "checkpoint_20"),
                      "--data", os.path.join(FIXTURE, "data", "validation.tsv"),
                      "--vocab", os.path.join(FIXTURE, "spm.model"), "--input-prefix", "name: ",
                      "--kv-heads", "2", "--methods", "mean,aligned,aligned-calibrated",
                      "--max-examples", "64",
                      "--calibration-data", os.path.join(FIXTURE, "data", "train.tsv"),
                      "--calibration-examples", "32"]) == 0
  out = capsys.readouterr().out
  losses = {m: float(v) for m, v in re.findall(
      r"^(MHA|mean|aligned|aligned-calibrated)\s+\d+\s+([\d.]+)$", out, re.MULTILINE)}
  assert set(losses) == {"MHA", "mean", "aligned", "aligned-calibrated"}
  assert 4.0 < losses["MHA"] < 5.0
  # Pooling loses information; on this checkpoint aligning first loses less, and aligning on
  # the heads' inputs (calibration on training examples) less again.
  assert losses["MHA"] < losses["aligned-calibrated"] < losses["aligned"] < losses["mean"]


def test_benchmark_convert_small_run(tmp_path, capsys):
  script = _script("benchmark_convert")
  assert script.main(["--size", "small", "--num-layers", "1", "--workdir", str(tmp_path),
                      "--compression", "zstd"]) == 0
  out = capsys.readouterr().out
  assert re.search(r"peak RSS of the converter: [\d.]+ GiB; target .*: OK", out)
  assert re.search(r"[\d.]+ MiB/s of tensor data", out)
  assert os.listdir(tmp_path) == []  # checkpoints removed without --keep
