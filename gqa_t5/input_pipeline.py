"""Training and evaluation batches from seqio tasks (T5X's `DatasetConfig` and friends).

Each host reads its own shard (`seqio.ShardInfo(process_index, process_count)`) and yields
`batch_size / process_count` rows; the partitioner assembles the global batch. The train
stream is deterministic for a given seed, so a resumed run skips exactly the batches it has
already consumed and then sees the batches an uninterrupted run would have seen.

Data code: imports seqio/TensorFlow, never the model.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib
from typing import Any, Dict, Iterator, Mapping, Optional

import numpy as np


@dataclasses.dataclass(frozen=True)
class DatasetConfig:
  """T5X's `utils.DatasetConfig` fields.

  mixture_or_task_name: a registered seqio task or mixture.
  task_feature_lengths: e.g. {'inputs': 512, 'targets': 114}.
  split: dataset split; batch_size: GLOBAL batch size (all hosts together).
  shuffle / seed: shuffling; the seed makes the order reproducible (and resumable).
  pack: pack several examples per row (EncDecFeatureConverter(pack=True)).
  use_cached: read seqio's offline cache.
  module: what registers the task: a module to import ('pkg.mod'), or a module and a
    function to call ('gqa_t5.tasks.paper:register_paper_tasks').
  """
  mixture_or_task_name: str
  task_feature_lengths: Optional[Mapping[str, int]]
  split: str = "train"
  batch_size: int = 128
  shuffle: bool = True
  seed: Optional[int] = 0
  pack: bool = True
  use_cached: bool = False
  module: Optional[str] = None


_REGISTERED = set()


def import_task_module(module: Optional[str]) -> None:
  """Imports 'pkg.mod', or imports 'pkg.mod' and calls its `fn` for 'pkg.mod:fn' (once)."""
  if not module or module in _REGISTERED:
    return
  name, _, function = module.partition(":")
  try:
    mod = importlib.import_module(name)
  except ImportError as error:
    raise ValueError(f"cannot import the task module {name!r}: {error}") from error
  if function:
    register = getattr(mod, function, None)
    if not callable(register):
      raise ValueError(f"task module {name!r} has no function {function!r}")
    register()
  _REGISTERED.add(module)


def get_task(cfg: DatasetConfig):
  """The seqio task or mixture, or a ValueError listing similar registered names."""
  import seqio  # pylint: disable=g-import-not-at-top
  import_task_module(cfg.module)
  name = cfg.mixture_or_task_name
  try:
    return seqio.get_mixture_or_task(name)
  except ValueError:
    known = sorted(set(seqio.TaskRegistry.names()) | set(seqio.MixtureRegistry.names()))
    close = difflib.get_close_matches(name, known, n=5, cutoff=0.5)
    hint = f"; did you mean {close}?" if close else ""
    raise ValueError(
        f"unknown seqio task or mixture {name!r}{hint} ({len(known)} registered; import the "
        f"module that registers it with DatasetConfig.module / MIXTURE_OR_TASK_MODULE)"
    ) from None


def check_split(cfg: DatasetConfig) -> None:
  task = get_task(cfg)
  splits = getattr(task, "splits", None)
  if splits and cfg.split not in splits:
    raise ValueError(f"task {cfg.mixture_or_task_name!r} has no split {cfg.split!r}; "
                     f"it has {sorted(splits)}")


VOCAB_SIZE_MULTIPLE = 128  # T5 pads 32,100 ids to 32,128 embedding rows


def padded_vocab_size(num_ids: int, multiple: int = VOCAB_SIZE_MULTIPLE) -> int:
  return -(-int(num_ids) // multiple) * multiple


def check_vocab_size(cfg: DatasetConfig, model_vocab_size: int) -> None:
  """The model's embedding must fit the task's vocabularies: at least their ids, at most
  their size rounded up to a multiple of 128 (a larger table means the model was built for
  another vocabulary, e.g. T5's 32,128 ids on a demo vocabulary of 8,000)."""
  task = get_task(cfg)
  for feature, spec in sorted(task.output_features.items()):
    num_ids = int(spec.vocabulary.vocab_size)
    padded = padded_vocab_size(num_ids)
    if not num_ids <= model_vocab_size <= padded:
      raise ValueError(
          f"the model's vocab_size is {model_vocab_size} but the {feature!r} vocabulary of task "
          f"{cfg.mixture_or_task_name!r} has {num_ids} ids: set network.T5Config.vocab_size = "
          f"{padded} ({num_ids} rounded up to a multiple of {VOCAB_SIZE_MULTIPLE}), or bind "
          f"VOCABULARY to the vocabulary the model was built for")


def feature_converter(pack: bool):
  import seqio  # pylint: disable=g-import-not-at-top
  return seqio.EncDecFeatureConverter(pack=pack)


def check_feature_lengths(cfg: DatasetConfig) -> Dict[str, int]:
  """TASK_FEATURE_LENGTHS with 'inputs' and 'targets', each a positive integer."""
  lengths = dict(cfg.task_feature_lengths or {})
  if "inputs" not in lengths or "targets" not in lengths:
    raise ValueError(f"TASK_FEATURE_LENGTHS needs 'inputs' and 'targets', got {lengths}")
  for feature, length in lengths.items():
    if isinstance(length, bool) or not isinstance(length, (int, np.integer)) or length <= 0:
      raise ValueError(f"TASK_FEATURE_LENGTHS[{feature!r}] must be a positive integer, got "
                       f"{length!r}")
  return {k: int(v) for k, v in lengths.items()}


def model_feature_spec(cfg: DatasetConfig) -> Dict[str, Any]:
  """{feature: (global batch shape, dtype)} that EncDecFeatureConverter produces for `cfg`,
  worked out from the lengths alone (no data is read)."""
  lengths = check_feature_lengths(cfg)
  enc = (cfg.batch_size, int(lengths["inputs"]))
  dec = (cfg.batch_size, int(lengths["targets"]))
  spec = {"encoder_input_tokens": (enc, np.int32), "decoder_target_tokens": (dec, np.int32),
          "decoder_input_tokens": (dec, np.int32), "decoder_loss_weights": (dec, np.int32)}
  if cfg.pack:
    spec.update(encoder_segment_ids=(enc, np.int32), encoder_positions=(enc, np.int32),
                decoder_segment_ids=(dec, np.int32), decoder_positions=(dec, np.int32))
  return spec


def host_batch_size(global_batch: int, process_count: int) -> int:
  if global_batch % process_count:
    raise ValueError(f"batch size {global_batch} is not a multiple of the {process_count} "
                     f"processes")
  return global_batch // process_count


def get_dataset(cfg: DatasetConfig, shard_index: int = 0, num_shards: int = 1,
                num_epochs: Optional[int] = None, drop_remainder: bool = True):
  """This host's tf.data.Dataset of batches of model features (numpy-convertible)."""
  import seqio  # pylint: disable=g-import-not-at-top
  check_feature_lengths(cfg)
  task = get_task(cfg)
  ds = seqio.get_dataset(
      task, task_feature_lengths=cfg.task_feature_lengths,
      feature_converter=feature_converter(cfg.pack), dataset_split=cfg.split,
      use_cached=cfg.use_cached, shuffle=cfg.shuffle, num_epochs=num_epochs,
      shard_info=seqio.ShardInfo(index=shard_index, num_shards=num_shards),
      verbose=False, seed=cfg.seed)
  return ds.batch(host_batch_size(cfg.batch_size, num_shards), drop_remainder=drop_remainder)


class TrainBatches:
  """An endless, resumable iterator of host-local numpy train batches.

  `position` counts the batches handed out; `restore(position)` rebuilds the stream and skips
  that many, so a resumed run continues with exactly the batch it would have seen next.
  """

  def __init__(self, cfg: DatasetConfig, shard_index: int = 0, num_shards: int = 1,
               dataset_fn=None):
    self.cfg = cfg
    self.shard_index = shard_index
    self.num_shards = num_shards
    self._dataset_fn = dataset_fn or (
        lambda: get_dataset(cfg, shard_index, num_shards, num_epochs=None))
    self.position = 0
    self._iterator: Optional[Iterator[Dict[str, np.ndarray]]] = None
    self._dataset = None

  def _base_dataset(self):
    if self._dataset is None:
      self._dataset = self._dataset_fn()
    return self._dataset

  def restore(self, position: int) -> None:
    ds = self._base_dataset()
    if position:
      ds = ds.skip(position)
    self._iterator = iter(ds.prefetch(2).as_numpy_iterator())
    self.position = position

  def __iter__(self):
    return self

  def __next__(self) -> Dict[str, np.ndarray]:
    if self._iterator is None:
      self.restore(self.position)
    batch = next(self._iterator)
    self.position += 1
    return batch

  def element_spec(self) -> Dict[str, Any]:
    """{feature: (shape, dtype)} of one host batch."""
    ds = self._base_dataset()
    return {k: (tuple(v.shape), v.dtype.as_numpy_dtype) for k, v in ds.element_spec.items()}

  def state(self) -> Dict[str, Any]:
    return {"position": int(self.position), "task": self.cfg.mixture_or_task_name,
            "split": self.cfg.split, "batch_size": int(self.cfg.batch_size),
            "seed": self.cfg.seed, "shard_index": self.shard_index,
            "num_shards": self.num_shards}


def eval_batches(cfg: DatasetConfig, num_batches: Optional[int], shard_index: int = 0,
                 num_shards: int = 1):
  """Up to `num_batches` host batches of the (non-repeated) evaluation split."""
  ds = get_dataset(cfg, shard_index, num_shards, num_epochs=1, drop_remainder=True)
  if num_batches is not None:
    ds = ds.take(num_batches)
  return ds.as_numpy_iterator()


def pad_batch(batch: Mapping[str, np.ndarray], batch_size: int) -> Dict[str, np.ndarray]:
  """Pads a partial batch with all-zero rows (padding tokens) up to `batch_size`."""
  out = {}
  for key, value in batch.items():
    value = np.asarray(value)
    missing = batch_size - value.shape[0]
    if missing < 0:
      raise ValueError(f"batch of {value.shape[0]} rows exceeds batch size {batch_size}")
    if missing:
      pad = np.zeros((missing,) + value.shape[1:], value.dtype)
      value = np.concatenate([value, pad], axis=0)
    out[key] = value
  return out
