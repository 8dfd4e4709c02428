"""Every gin file parses and builds its model abstractly (XXL included, with jax.eval_shape);
flags, REQUIRED macros and typos give clear errors; the entry point trains and dry-runs."""

import functools
import glob
import json
import os

import jax
import pytest
pytest.importorskip("gin")  # the data extra; absent on a TensorFlow-free GPU box
import gin
from gin import config as gin_config

import trainer_fixtures as fx
from gqa_t5 import evaluation
from gqa_t5 import gin_utils
from gqa_t5 import models
from gqa_t5 import optim
from gqa_t5 import partitioning
from gqa_t5 import prediction
from gqa_t5 import schedules
from gqa_t5.model import network
from gqa_t5.tasks import lengths

GIN_DIR = os.path.join(fx.REPO, "gin")
REQUIRED_TRAIN = ["MODEL_DIR='/tmp/unused'", "INITIAL_CHECKPOINT_PATH='/tmp/unused'",
                  "TRAIN_STEPS=1100000"]
T5X_DIMS = {  # emb, heads, encoder/decoder layers, head_dim, mlp (T5X's t5_1_1 gin files)
    "small": (512, 6, 8, 64, 1024), "base": (768, 12, 12, 64, 2048),
    "large": (1024, 16, 24, 64, 2816), "xl": (2048, 32, 24, 64, 5120),
    "xxl": (4096, 64, 24, 64, 10240)}


def _files(pattern):
  return sorted(os.path.relpath(p, GIN_DIR) for p in glob.glob(os.path.join(GIN_DIR, pattern)))


def _bound(selector: str):
  for (scope, name), params in gin_config._CONFIG.items():  # pylint: disable=protected-access
    if scope == "" and name.endswith(selector):
      return params
  raise AssertionError(f"nothing bound to {selector}")


def _evaluate(value):
  if isinstance(value, gin_config.ConfigurableReference):
    return value.scoped_configurable_fn() if value.evaluate else value.scoped_configurable_fn
  return value


@functools.lru_cache(maxsize=None)
def _abstract_param_count(config):
  model = models.EncoderDecoderModel(network.Transformer(config))
  params, _ = partitioning.abstract_params_and_axes(model)
  return sum(x.size for x in jax.tree.leaves(params)), params


def _build(files, bindings=()):
  gin_utils.parse(files, list(bindings))
  model = _evaluate(gin_config._CONFIG[("MODEL", "gin.macro")]["value"])  # pylint: disable=protected-access
  config = model.module.config
  count, params = _abstract_param_count(config)
  return config, count, params


def test_every_gin_file_is_covered_below():
  covered = set(_files("t5_1_1/*.gin") + _files("attention/*.gin") + _files("runs/*.gin")
                + _files("paper/*.gin") + _files("paper/*/*.gin")
                + _files("t5x/*.gin"))  # t5x/: tests/test_t5x_gin.py
  assert covered == set(_files("**/*.gin")) | set(_files("*/*/*.gin"))
  assert len(covered) >= 30


@pytest.mark.parametrize("name", ["tiny", "small", "base", "large", "xl", "xxl"])
def test_model_size_files_have_t5x_dimensions(name):
  config, count, _ = _build([f"t5_1_1/{name}.gin"], ["DROPOUT_RATE=0.0"])
  assert config.vocab_size == 32128 and config.mlp_activations == ("gelu", "linear")
  assert config.num_kv_heads is None and config.dropout_rate == 0.0
  if name != "tiny":
    emb, heads, layers, head_dim, mlp = T5X_DIMS[name]
    assert (config.emb_dim, config.num_heads, config.num_encoder_layers,
            config.num_decoder_layers, config.head_dim, config.mlp_dim) == (
                emb, heads, layers, layers, head_dim, mlp)
    assert config.dtype == "bfloat16"
  if name == "xxl":
    assert 11.0e9 < count < 11.5e9, count  # T5.1.1 XXL: 11B parameters


@pytest.mark.parametrize("name", _files("attention/*.gin"))
def test_attention_files_set_kv_heads(name):
  expected = {"mha.gin": None, "mqa.gin": 1}.get(os.path.basename(name))
  if os.path.basename(name).startswith("gqa_"):
    expected = int(os.path.basename(name)[4:-4])
  if expected is not None and 12 % expected:
    # T5.1.1 Base has 12 heads: the config refuses K = 8, 16, 32 (checked on XXL below).
    with pytest.raises(ValueError, match="does not divide num_heads=12"):
      _build(["t5_1_1/base.gin", name], ["DROPOUT_RATE=0.0"])
    return
  config, _, params = _build(["t5_1_1/base.gin", name], ["DROPOUT_RATE=0.0"])
  assert config.num_kv_heads == expected
  k = expected or config.num_heads
  kernel = params["decoder"]["layers_0"]["self_attention"]["key"]["kernel"]
  assert kernel.shape == (768, k * 64)
  cross = params["decoder"]["layers_0"]["encoder_decoder_attention"]["value"]["kernel"]
  assert cross.shape == (768, k * 64)


@pytest.mark.parametrize("k", [2, 4, 8, 16, 32])
def test_every_gqa_file_applies_to_xxl(k):
  config, _, params = _build(["t5_1_1/xxl.gin", f"attention/gqa_{k}.gin"],
                             ["DROPOUT_RATE=0.0"])
  assert config.num_kv_heads == k
  assert params["decoder"]["layers_23"]["self_attention"]["key"]["kernel"].shape == (
      4096, k * 64)


@pytest.mark.parametrize("run", ["pretrain", "uptrain", "finetune"])
def test_train_run_files_bind_everything(run):
  bindings = ["MIXTURE_OR_TASK_NAME='cnn_dailymail'",
              "TASK_FEATURE_LENGTHS={'inputs': 512, 'targets': 256}", *REQUIRED_TRAIN]
  config, _, _ = _build(["t5_1_1/tiny.gin", "attention/gqa_2.gin", f"runs/{run}.gin"],
                        bindings)
  args = {k: _evaluate(v) for k, v in _bound("train.train").items()}
  assert args["train_dataset_cfg"].mixture_or_task_name == "cnn_dailymail"
  assert args["train_dataset_cfg"].pack and args["train_dataset_cfg"].split == "train"
  assert args["train_eval_dataset_cfg"].split == "validation"
  assert args["model"].module.config.num_kv_heads == 2
  lr = args["optimizer"].learning_rate
  if run == "finetune":
    assert config.dropout_rate == 0.1 and args["train_dataset_cfg"].batch_size == 128
    assert float(lr(0)) == pytest.approx(0.001) and float(lr(10**6)) == pytest.approx(0.001)
    assert args["infer_eval_dataset_cfg"].pack is False
    assert args["decoding"].method == "greedy"
  else:
    assert config.dropout_rate == 0.0
    assert float(lr(0)) == pytest.approx(0.01) and float(lr(40_000)) == pytest.approx(0.005)
  assert args["kv_conversion"] == ("mean" if run == "uptrain" else None)
  assert args["optimizer"].decay_rate == 0.8 and args["optimizer"].clipping_threshold == 1.0


@pytest.mark.parametrize("run,fn", [("eval", "eval.evaluate"),
                                    ("infer", "infer.infer")])
def test_eval_and_infer_run_files_bind_everything(run, fn):
  out = "EVAL_OUTPUT_DIR" if run == "eval" else "INFER_OUTPUT_DIR"
  _build(["t5_1_1/tiny.gin", "attention/mqa.gin", f"runs/{run}.gin"],
         ["MIXTURE_OR_TASK_NAME='trivia_qa'", "TASK_FEATURE_LENGTHS={'inputs': 2048, "
          "'targets': 32}", "CHECKPOINT_PATH='/tmp/ckpt'", f"{out}='/tmp/out'"])
  args = {k: _evaluate(v) for k, v in _bound(fn).items()}
  assert args["dataset_cfg"].pack is False and args["checkpoint_path"] == "/tmp/ckpt"
  assert args["decoding"].method == "greedy"


@pytest.mark.parametrize("name", _files("paper/uptrain_*.gin"))
def test_paper_uptraining_files(name):
  config, count, _ = _build([name], ["MODEL_DIR='/tmp/unused'",
                                     "INITIAL_CHECKPOINT_PATH='/tmp/t5_1_1_xxl'"])
  args = {k: _evaluate(v) for k, v in _bound("train.train").items()}
  assert config.num_heads == 64 and config.emb_dim == 4096
  assert config.num_kv_heads == (1 if "mqa" in name else 8)
  assert args["total_steps"] == 1_050_000       # 1M pre-training steps + alpha = 0.05
  assert args["kv_conversion"] == "mean"
  assert args["train_dataset_cfg"].mixture_or_task_name == "c4_span_corruption"
  assert dict(args["train_dataset_cfg"].task_feature_lengths) == dict(
      lengths.PAPER_FEATURE_LENGTHS["c4_span_corruption"])
  assert args["train_dataset_cfg"].batch_size == 2048
  assert args["partitioner"].model_parallel == 8
  assert float(args["optimizer"].learning_rate(1_000_000)) == pytest.approx(0.001)
  assert count < 11.0e9  # fewer key/value parameters than MHA-XXL


@pytest.mark.parametrize("name", _files("paper/finetune/*.gin"))
def test_paper_finetuning_files(name):
  task = os.path.basename(name)[:-4]
  config, _, _ = _build(["paper/models/mha_large.gin", name], REQUIRED_TRAIN)
  args = {k: _evaluate(v) for k, v in _bound("train.train").items()}
  assert args["train_dataset_cfg"].mixture_or_task_name == task
  assert dict(args["train_dataset_cfg"].task_feature_lengths) == dict(
      lengths.PAPER_FEATURE_LENGTHS[task])
  assert args["train_dataset_cfg"].batch_size == 128 and config.dropout_rate == 0.1
  assert float(args["optimizer"].learning_rate(123)) == pytest.approx(0.001)
  assert args["decoding"].method == "greedy"
  assert args["infer_eval_dataset_cfg"].mixture_or_task_name == task


@pytest.mark.parametrize("name", _files("paper/models/*.gin"))
def test_paper_model_files(name):
  config, _, _ = _build([name], ["DROPOUT_RATE=0.0"])
  variant = os.path.basename(name)[:-4]
  expected = {"mha_large": (16, None), "mqa_large": (16, 1), "gqa8_large": (16, 8),
              "mha_xxl": (64, None), "mqa_xxl": (64, 1), "gqa8_xxl": (64, 8)}[variant]
  assert (config.num_heads, config.num_kv_heads) == expected
  # The paper's jobs were compiled and checked scanned (gqa-t5 compile).
  assert config.scan_layers


def test_flags_split_the_t5x_way():
  files, bindings, paths, rest = gin_utils.split_gin_flags(
      ["--gin_file=a.gin", "--gin_file", "b.gin", "--gin.MODEL_DIR='/tmp/x'",
       "--gin.TRAIN_STEPS", "10", "--gin_bindings=X=1", "--gin_search_paths=/p,/q",
       "--dry_run"])
  assert files == ["a.gin", "b.gin"]
  assert bindings == ["MODEL_DIR='/tmp/x'", "TRAIN_STEPS=10", "X=1"]
  assert paths == ["/p", "/q"] and rest == ["--dry_run"]


def test_missing_required_macros_are_all_named():
  with pytest.raises(gin_utils.GinConfigError,
                     match=r"REQUIRED gin macro\(s\) not set: INITIAL_CHECKPOINT_PATH, "
                           r"MIXTURE_OR_TASK_NAME, MODEL_DIR, TASK_FEATURE_LENGTHS, "
                           r"TRAIN_STEPS.*--gin.MODEL_DIR=\.\.\."):
    gin_utils.parse(["t5_1_1/tiny.gin", "runs/finetune.gin"], [])


def test_a_gin_typo_is_a_clear_error():
  with pytest.raises(gin_utils.GinConfigError, match=r"doesn't have a parameter named "
                                                      r"'emb_dimm'"):
    gin_utils.parse(["t5_1_1/tiny.gin"], ["DROPOUT_RATE=0.0",
                                          "network.T5Config.emb_dimm=3"])
  with pytest.raises(gin_utils.GinConfigError, match="No such file|Unable to open"):
    gin_utils.parse(["t5_1_1/tinyy.gin"], [])


_toy_flags = fx.toy_train_flags


def test_train_eval_and_infer_entry_points(tmp_path, capsys):
  from gqa_t5 import eval as eval_main
  from gqa_t5 import infer as infer_main
  from gqa_t5 import train
  run = tmp_path / "run"
  assert train.main(_toy_flags(run)) == 0
  config_gin = (run / "config.gin").read_text()
  assert "NUM_KV_HEADS = 2" in config_gin and "train.train" in config_gin
  assert sorted(os.listdir(run / "checkpoints")) == ["2"]

  common = ["--gin_file=t5_1_1/tiny.gin", "--gin_file=attention/gqa_2.gin",
            f"--gin.MIXTURE_OR_TASK_NAME='{fx.TOY_TASK}'",
            f"--gin.TASK_FEATURE_LENGTHS={fx.LENGTHS}",
            "--gin.MIXTURE_OR_TASK_MODULE='trainer_fixtures:register_toy_task'",
            f"--gin.CHECKPOINT_PATH='{run}'", "--gin.BATCH_SIZE=8", "--gin.NUM_EXAMPLES=12",
            "--gin.network.T5Config.vocab_size=320", "--jax_cache_dir="]
  assert eval_main.main(common + ["--gin_file=runs/eval.gin",
                                  f"--gin.EVAL_OUTPUT_DIR='{tmp_path / 'eval'}'"]) == 0
  rows = [json.loads(line) for line in (tmp_path / "eval" / "metrics.jsonl").open()]
  assert rows[0]["step"] == 2 and f"{fx.TOY_TASK}/sequence_accuracy" in rows[0]

  assert infer_main.main(common + ["--gin_file=runs/infer.gin",
                                   f"--gin.INFER_OUTPUT_DIR='{tmp_path / 'infer'}'"]) == 0
  path = tmp_path / "infer" / f"{fx.TOY_TASK}-validation-2.jsonl"
  records = [json.loads(line) for line in path.open()]
  assert [r["index"] for r in records] == list(range(12))
  assert all(set(r) >= {"inputs", "prediction", "targets", "score"} for r in records)
  assert all(set(r["inputs"]) <= set(fx.ALPHABET) for r in records)
  # A wrong K for the checkpoint is refused naming the setting, the tensor and the remedy that
  # applies to eval (not training's pooling at load or its opt-in to fresh parameters).
  capsys.readouterr()
  assert eval_main.main([a.replace("gqa_2", "mqa") for a in common] + [
      "--gin_file=runs/eval.gin", f"--gin.EVAL_OUTPUT_DIR='{tmp_path / 'eval2'}'"]) == 2
  err = capsys.readouterr().err
  assert f"gqa_t5.eval: error: CHECKPOINT_PATH {run / 'checkpoints' / '2'} does not match" in err
  assert "self_attention/key/kernel has shape (64, 32)" in err and "(gqa-t5 convert)." in err
  for training_only in ("INITIAL_CHECKPOINT_PATH", "kv_conversion", "allow_fresh_params"):
    assert training_only not in err, (training_only, err)
  assert infer_main.main([a.replace(str(run), str(tmp_path / "nothing")) for a in common] + [
      "--gin_file=runs/infer.gin", f"--gin.INFER_OUTPUT_DIR='{tmp_path / 'infer2'}'"]) == 2
  assert (f"gqa_t5.infer: error: CHECKPOINT_PATH {tmp_path / 'nothing'} does not exist\n"
          == capsys.readouterr().err.splitlines(keepends=True)[-1])


def test_train_entry_point_dry_run_prints_memory_per_device(tmp_path, capsys):
  from gqa_t5 import train
  assert train.main(_toy_flags(tmp_path / "dry") + ["--dry_run"]) == 0
  out = capsys.readouterr().out
  assert "dry run: mesh (data=1, model=1)" in out
  assert "parameters per device" in out and "estimated peak per device" in out
  assert not os.path.exists(tmp_path / "dry" / "checkpoints")


def test_entry_point_reports_missing_macros_with_exit_status_2(capsys):
  from gqa_t5 import train
  assert train.main(["--gin_file=t5_1_1/tiny.gin", "--gin_file=runs/pretrain.gin",
                     "--jax_cache_dir="]) == 2
  assert "REQUIRED gin macro(s) not set" in capsys.readouterr().err


def test_schedules_keep_their_gin_names_from_before_schedules_py():
  gin.clear_config()
  try:
    gin.parse_config("from __gin__ import dynamic_registration\n"
                     "from gqa_t5 import optim\n"
                     "optim.constant.value = 0.25\n")
    assert optim.constant is schedules.constant  # the same function, not a copy
    assert float(gin.get_configurable(schedules.constant)()(3)) == 0.25
  finally:
    gin.clear_config()


def test_decoding_config_keeps_its_gin_name_from_before_prediction_py():
  gin.clear_config()
  try:
    gin.parse_config("from __gin__ import dynamic_registration\n"
                     "from gqa_t5 import evaluation\n"
                     "evaluation.DecodingConfig.num_decodes = 3\n")
    assert evaluation.DecodingConfig is prediction.DecodingConfig
    assert gin.get_configurable(prediction.DecodingConfig)().num_decodes == 3
  finally:
    gin.clear_config()
