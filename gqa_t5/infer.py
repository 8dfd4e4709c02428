"""`python -m gqa_t5.infer --gin_file=runs/infer.gin --gin.CHECKPOINT_PATH=... ...`: the
standalone inference run gin configures (`gqa_t5.infer.infer`, T5X's infer.py) and its `main`.

It decodes a task's split with a checkpoint and writes one JSON line per example; the
batched decoding it uses lives in prediction.py.
"""

from __future__ import annotations

import os
import sys
from typing import List, Optional, Sequence

import jax
import numpy as np

from gqa_t5 import checkpoint_loading
from gqa_t5 import entry_point
from gqa_t5 import input_pipeline
from gqa_t5 import partitioning as partitioning_lib
from gqa_t5 import prediction

DESCRIPTION = ("decode a task's split with a checkpoint and write the predictions as JSON "
               "lines (gin configures gqa_t5.infer.infer)")


def _trim(tokens: np.ndarray, eos_id: int) -> List[int]:
  out = []
  for t in tokens.tolist():
    out.append(int(t))
    if t == eos_id:
      break
  return out


def _unpad(tokens: np.ndarray) -> List[int]:
  return [int(t) for t in tokens.tolist() if t != 0]


def infer(*, model, dataset_cfg: input_pipeline.DatasetConfig, checkpoint_path: str,
          output_dir: str, partitioner: Optional[partitioning_lib.Partitioner] = None,
          decoding: prediction.DecodingConfig = prediction.DecodingConfig(),
          num_examples: Optional[int] = None) -> str:
  """Decodes `dataset_cfg`'s split; writes one JSON line per example
  ({'index', 'inputs', 'prediction', 'targets', 'score'}) to
  OUTPUT_DIR/<task>-<split>-<step>.jsonl and returns that path."""
  import seqio  # pylint: disable=g-import-not-at-top
  partitioner = partitioner or partitioning_lib.Partitioner()
  task = input_pipeline.get_task(dataset_cfg)
  input_pipeline.check_split(dataset_cfg)
  if getattr(model.module, "config", None) is not None:
    input_pipeline.check_vocab_size(dataset_cfg, model.module.config.vocab_size)
  params, step = checkpoint_loading.load_checkpoint_params(model, partitioner, checkpoint_path)
  ds = seqio.get_dataset(
      task, task_feature_lengths=dataset_cfg.task_feature_lengths,
      feature_converter=input_pipeline.feature_converter(pack=False),
      dataset_split=dataset_cfg.split, use_cached=dataset_cfg.use_cached, shuffle=False,
      num_epochs=1, verbose=False, seed=dataset_cfg.seed)
  if num_examples is not None:
    ds = ds.take(num_examples)
  predictor = prediction.Predictor(model, partitioner, params, dataset_cfg.batch_size, decoding)
  features = task.output_features
  vocab_in = features["inputs"].vocabulary if "inputs" in features else None
  vocab_out = features["targets"].vocabulary

  # Every process decodes (the step is collective); only process 0 writes.
  records = []
  for indices, batch in prediction.padded_batches(ds.enumerate(), dataset_cfg.batch_size):
    tokens, scores = predictor.predict_batch(batch)
    for row, index in enumerate(indices):
      record = {"index": int(index),
                "prediction": vocab_out.decode(_trim(tokens[row], model.eos_id)),
                "score": float(scores[row])}
      if vocab_in is not None:
        record["inputs"] = vocab_in.decode(_unpad(batch["encoder_input_tokens"][row]))
      if "decoder_target_tokens" in batch:
        record["targets"] = vocab_out.decode(_unpad(batch["decoder_target_tokens"][row]))
      records.append(record)

  path = os.path.join(output_dir, f"{dataset_cfg.mixture_or_task_name}-{dataset_cfg.split}-"
                                  f"{step}.jsonl")
  prediction.write_predictions(path, records)
  if jax.process_index() == 0:
    print(path, flush=True)
  return path


def main(argv: Optional[Sequence[str]] = None) -> int:
  return entry_point.run_entry_point(argv, "gqa_t5.infer", "gqa_t5.infer.infer", DESCRIPTION)


if __name__ == "__main__":
  sys.exit(main())
