"""Shared pieces of the trainer tests: a learnable toy seqio task and a tiny model (the
`tiny_configs` variant "trainer").

The toy task copies a short random string over 8 letters (byte vocabulary, EOS = 1): a tiny
model's loss falls within a few dozen steps. Examples are a fixed function of the index, so every process and
every run sees the same data.
"""

from __future__ import annotations

import os
import sys

import numpy as np

from tiny_configs import VARIANTS, tiny_config

TOY_TASK = "gqa_t5_test_toy_copy"
VOCAB = VARIANTS["trainer"]["vocab_size"]
ALPHABET = "abcdefgh"
LENGTHS = {"inputs": 16, "targets": 16}
NUM_EXAMPLES = {"train": 512, "validation": 64}
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _examples(split: str):
  rng = np.random.default_rng(0 if split == "train" else 1)
  out = []
  for _ in range(NUM_EXAMPLES[split]):
    length = int(rng.integers(3, 9))
    out.append("".join(rng.choice(list(ALPHABET), size=length)))
  return out


def register_toy_task(name: str = TOY_TASK, extra_ids: int = 0):
  """Registers (idempotently) the copy task over bytes; returns its name. `extra_ids` adds
  unused ids to the vocabulary (259 + extra_ids), to fit a model of another vocab_size."""
  import seqio
  import tensorflow as tf

  def dataset_fn(split, shuffle_files=False, seed=None):
    del shuffle_files, seed
    texts = _examples(split)
    return tf.data.Dataset.from_tensor_slices({"inputs": texts, "targets": texts})

  def sequence_accuracy(targets, predictions):
    hits = [t == p for t, p in zip(targets, predictions)]
    return {"sequence_accuracy": 100.0 * float(np.mean(hits))}

  vocab = seqio.ByteVocabulary(extra_ids=extra_ids)
  seqio.TaskRegistry.remove(name)
  seqio.TaskRegistry.add(
      name,
      source=seqio.FunctionDataSource(dataset_fn, splits=("train", "validation")),
      preprocessors=[seqio.preprocessors.tokenize, seqio.preprocessors.append_eos_after_trim],
      output_features={"inputs": seqio.Feature(vocab, add_eos=True),
                       "targets": seqio.Feature(vocab, add_eos=True)},
      metric_fns=[sequence_accuracy])
  return name


def tiny_model(num_kv_heads=None, **overrides):
  from gqa_t5 import models
  from gqa_t5.model import network
  return models.EncoderDecoderModel(
      network.Transformer(tiny_config("trainer", num_kv_heads, **overrides)))


def dataset_cfg(split="train", batch_size=8, shuffle=True, pack=True, seed=0, task=TOY_TASK,
                module="trainer_fixtures:register_toy_task"):
  from gqa_t5.input_pipeline import DatasetConfig
  return DatasetConfig(task, dict(LENGTHS), split=split, batch_size=batch_size,
                       shuffle=shuffle, seed=seed, pack=pack, module=module)


def subprocess_env(num_devices=None):
  """Environment for a child Python that imports gqa_t5 and this module."""
  env = dict(os.environ)
  paths = [REPO, os.path.join(REPO, "tests")]
  if env.get("PYTHONPATH"):
    paths.append(env["PYTHONPATH"])
  env["PYTHONPATH"] = os.pathsep.join(paths)
  env["JAX_PLATFORMS"] = "cpu"
  env["TF_CPP_MIN_LOG_LEVEL"] = "3"
  if num_devices:
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={num_devices}"
  return env


PYTHON = sys.executable


class PoisonedModel:
  """A model wrapper whose `loss_fn` a test bends (NaN losses or gradients after the first
  update) to exercise the trainer's non-finite handling; the rest is the wrapped model's."""

  def __init__(self, model):
    self.module = model.module
    self._model = model
    self.loss_normalizing_factor = None

  def get_initial_variables(self, *args, **kwargs):
    return self._model.get_initial_variables(*args, **kwargs)


def toy_train_flags(model_dir, steps=2, *extra):
  """`python -m gqa_t5.train` flags of a tiny GQA-2 run on the toy task."""
  return ["--gin_file=t5_1_1/tiny.gin", "--gin_file=attention/gqa_2.gin",
          "--gin_file=runs/pretrain.gin",
          f"--gin.MIXTURE_OR_TASK_NAME='{TOY_TASK}'",
          f"--gin.TASK_FEATURE_LENGTHS={LENGTHS}",
          "--gin.MIXTURE_OR_TASK_MODULE='trainer_fixtures:register_toy_task'",
          f"--gin.TRAIN_STEPS={steps}", f"--gin.MODEL_DIR='{model_dir}'",
          "--gin.BATCH_SIZE=8", "--gin.EVAL_PERIOD=0", "--gin.LOG_PERIOD=1",
          "--gin.network.T5Config.vocab_size=320", "--no_progress", "--jax_cache_dir=",
          *extra]
