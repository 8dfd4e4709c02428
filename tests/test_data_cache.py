"""Issue 21: no tf.data partial-cache warning from the project's tasks, and the same data.

seqio caches the raw records of a split with fewer than 10,000 examples in memory; read only
partly (training for N steps, the first batches of a probe or a teacher-forced loss,
seqio.Evaluator's first `num_examples`), tf.data discarded that cache and printed
`cache_dataset_ops.cc:912] The calling iterator did not fully read the dataset being cached`
each time (about 70 lines per `gqa-t5 reproduce` run). The project's tasks
(`registration.Task`) no longer cache in memory. Checked on demo data written as
test_reproduce_pipeline writes it: the warning's count in the stderr of a subprocess that
reads every affected path partly (and, as a control, that the same reads with seqio's cache
restored do print it), and batch-for-batch equality of the data with and without the cache.
"""

import subprocess

import numpy as np
import pytest

import trainer_fixtures as fx
from test_reproduce_pipeline import write_tiny_demo_data

WARNING = "did not fully read the dataset being cached"
LENGTHS = {"inputs": 64, "targets": 16}

# Larger than every read-ahead buffer (seqio's shuffle buffer of 1,000 examples, packing's
# 64-example batches, prefetching), so that reading a few batches reads a split only partly,
# as on the real demo data.
PARTIAL_SIZES = {"train": 1500, "validation": 200, "test": 200}

# The data paths of `gqa-t5 reproduce`, each read partly as the pipeline reads them: first with
# seqio's in-memory cache (the behaviour before issue 21, the control), then as the project's
# tasks are now. A marker line on stderr ends each round.
SCRIPT = r"""
import gc, os, sys
import seqio
from gqa_t5 import input_pipeline
from gqa_t5.reproduce.pipeline import tasks
from gqa_t5.tasks import registration
tasks.register(sys.argv[1])
lengths = {"inputs": 64, "targets": 16}
project_get_dataset = registration.Task.get_dataset
for mode, get_dataset in (("seqio-cache", seqio.Task.get_dataset),
                          ("project", project_get_dataset)):
  registration.Task.get_dataset = get_dataset
  # Probe / teacher-forced loss: the first batch of a validation split (dataset_loss).
  cfg = input_pipeline.DatasetConfig("demo_span_corruption", lengths, split="validation",
                                     batch_size=2, shuffle=False, seed=42)
  assert len(list(input_pipeline.eval_batches(cfg, 1))) == 1
  # Fine-tuning: three batches of the endless, shuffled mixture.
  cfg = input_pipeline.DatasetConfig(tasks.FINETUNE_MIXTURE, lengths, batch_size=2, seed=0)
  batches = input_pipeline.TrainBatches(cfg)
  [next(batches) for _ in range(3)]
  del batches
  # Greedy evaluation: seqio.Evaluator over the first 2 test examples.
  evaluator = seqio.Evaluator("demo_summarize", input_pipeline.feature_converter(pack=False),
                              eval_split="test", sequence_length=lengths, num_examples=2,
                              async_compute_metrics=False)
  del evaluator
  gc.collect()
  os.write(2, f"=== {mode} done\n".encode())
"""


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
  """48 training examples per task: the training streams below cross epochs cheaply."""
  return write_tiny_demo_data(tmp_path_factory.mktemp("tiny") / "data")


@pytest.fixture(scope="module")
def partial_dir(tmp_path_factory):
  return write_tiny_demo_data(tmp_path_factory.mktemp("partial") / "data", PARTIAL_SIZES)


def test_no_partial_cache_warning(partial_dir):
  env = fx.subprocess_env()
  env["TF_CPP_MIN_LOG_LEVEL"] = "0"  # TF's warnings shown, as they were in the runs
  result = subprocess.run([fx.PYTHON, "-c", SCRIPT, str(partial_dir)], env=env,
                          capture_output=True, text=True, timeout=900)
  assert result.returncode == 0, result.stderr[-3000:]
  control, rest = result.stderr.split("=== seqio-cache done\n")
  project, _ = rest.split("=== project done\n")
  # With seqio's cache each of the three paths prints it (the test can see the warning) ...
  assert control.count(WARNING) >= 3, control[-3000:]
  # ... and with the project's tasks none does.
  assert project.count(WARNING) == 0, project[-3000:]


def _graph(ds) -> bytes:
  import tensorflow as tf
  return tf.raw_ops.DatasetToGraphV2(input_dataset=ds._variant_tensor,  # pylint: disable=protected-access
                                     external_state_policy=1).numpy()


def _read_all(data_dir):
  """{path: (its first batches, the dataset's graph)} for the affected paths. On the tiny data
  (7 span-corruption batches per epoch, 12 per fine-tuning task) the training streams run for
  about three epochs: where seqio cached, it replays its cache after the first."""
  import seqio
  from gqa_t5 import input_pipeline
  from gqa_t5.reproduce.pipeline import tasks
  tasks.register(str(data_dir))
  out = {}
  for name, task, steps in (("pretrain", tasks.PRETRAIN_TASK, 20),
                            ("finetune", tasks.FINETUNE_MIXTURE, 100)):
    cfg = input_pipeline.DatasetConfig(task, LENGTHS, batch_size=4, seed=3)
    ds = input_pipeline.get_dataset(cfg, num_epochs=None)
    batches = input_pipeline.TrainBatches(cfg, dataset_fn=lambda ds=ds: ds)
    out[name] = ([next(batches) for _ in range(steps)], _graph(ds))
    del batches
  probe = input_pipeline.DatasetConfig(tasks.PRETRAIN_TASK, LENGTHS, split="validation",
                                       batch_size=2, shuffle=False, seed=42)
  ds = input_pipeline.get_dataset(probe, num_epochs=1, drop_remainder=False)
  out["probe"] = (list(ds.take(3).as_numpy_iterator()), _graph(ds))
  evaluator = seqio.Evaluator("demo_translate_en_de",
                              input_pipeline.feature_converter(pack=False), eval_split="test",
                              sequence_length=LENGTHS, num_examples=5,
                              async_compute_metrics=False)
  ds = evaluator.cached_model_datasets["demo_translate_en_de"]
  out["evaluator"] = (list(ds.as_numpy_iterator()), b"")
  return out


def _same(a, b):
  if isinstance(a, dict):
    return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
  if isinstance(a, (tuple, list)):
    return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
  return np.array_equal(np.asarray(a), np.asarray(b))


def test_the_data_is_the_same_as_with_seqios_cache(tiny_dir, monkeypatch):
  import seqio
  from gqa_t5.tasks import registration
  now = _read_all(tiny_dir)
  with monkeypatch.context() as patch:
    patch.setattr(registration.Task, "get_dataset", seqio.Task.get_dataset)
    before = _read_all(tiny_dir)
  for path in ("pretrain", "finetune", "probe"):
    assert b"CacheDataset" in before[path][1], path  # the comparison is with the cache
    assert b"CacheDataset" not in now[path][1], path
  for path, (batches, _) in now.items():
    assert _same(batches, before[path][0]), path
