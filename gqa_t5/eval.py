"""`python -m gqa_t5.eval --gin_file=runs/eval.gin --gin.CHECKPOINT_PATH=... ...`: the standalone
evaluation run gin configures (`gqa_t5.eval.evaluate`, T5X's eval.py) and its `main`.

It decodes a task's split with a checkpoint and writes the task's metrics to
EVAL_OUTPUT_DIR/metrics.jsonl and TensorBoard; the evaluators live in evaluation.py.
"""

from __future__ import annotations

import sys
from typing import Dict, Optional, Sequence

import jax

from gqa_t5 import checkpoint_loading
from gqa_t5 import entry_point
from gqa_t5 import evaluation
from gqa_t5 import input_pipeline
from gqa_t5 import metrics_writer
from gqa_t5 import partitioning as partitioning_lib
from gqa_t5 import prediction

DESCRIPTION = ("decode a task's split with a checkpoint and report the task's metrics "
               "(gin configures gqa_t5.eval.evaluate)")


def evaluate(*, model, dataset_cfg: input_pipeline.DatasetConfig, checkpoint_path: str,
             output_dir: str, partitioner: Optional[partitioning_lib.Partitioner] = None,
             decoding: prediction.DecodingConfig = prediction.DecodingConfig(),
             num_examples: Optional[int] = None) -> Dict[str, float]:
  """Inference evaluation of a checkpoint: decode `dataset_cfg`'s split, score it with the
  task's metrics, write them to OUTPUT_DIR/metrics.jsonl and TensorBoard; returns them."""
  partitioner = partitioner or partitioning_lib.Partitioner()
  input_pipeline.check_split(dataset_cfg)
  if getattr(model.module, "config", None) is not None:
    input_pipeline.check_vocab_size(dataset_cfg, model.module.config.vocab_size)
  params, step = checkpoint_loading.load_checkpoint_params(model, partitioner, checkpoint_path)
  metrics = evaluation.inference_eval(model, partitioner, params, dataset_cfg, step, decoding,
                                      num_examples, log_dir=output_dir)
  writer = metrics_writer.MetricsWriter(output_dir)
  writer.write(step, metrics, "inference_eval")
  writer.close()
  if jax.process_index() == 0:
    for name, value in sorted(metrics.items()):
      print(f"{name} = {value:.6g}", flush=True)
  return metrics


def main(argv: Optional[Sequence[str]] = None) -> int:
  return entry_point.run_entry_point(argv, "gqa_t5.eval", "gqa_t5.eval.evaluate", DESCRIPTION)


if __name__ == "__main__":
  sys.exit(main())
