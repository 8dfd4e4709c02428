"""The paper's jobs at full scale, as data: the TPU slices, the six models (T5.1.1-Large/XXL
with MHA, MQA and GQA-8), every uptraining, fine-tuning and evaluation job with its gin files and
bindings, and the shell script that launches them on a pod (`commands_text`)."""

from __future__ import annotations

import dataclasses
from typing import Any, Dict, List, Optional, Tuple

from gqa_t5 import tpu_topology
from gqa_t5.model import sizes
from gqa_t5.reproduce.report import paper
from gqa_t5.tasks import lengths

PUBLIC_CHECKPOINTS = {
    "large": "gs://t5-data/pretrained_models/t5x/t5_1_1_large/checkpoint_1000000",
    "xxl": "gs://t5-data/pretrained_models/t5x/t5_1_1_xxl/checkpoint_1000000",
}
PRETRAIN_STEPS = 1_000_000
ALPHA = 0.05
UPTRAIN_BATCH = 2048
FINETUNE_BATCH = 128
FINETUNE_STEPS = 50_000   # the paper fine-tunes to convergence; a budget to adjust
FINETUNE_TASKS = ("cnn_dailymail", "arxiv", "pubmed", "mediasum", "multi_news",
                  "wmt14_en_de", "trivia_qa")
PRETRAIN_TASK = "c4_span_corruption"
# The paper's models run as one scanned layer stack per encoder/decoder (gin/paper/models/*.gin
# set SCAN_LAYERS; the dry run checks that they do): it bounds the activations a train step
# keeps and the time TPU's compiler takes.
SCAN_LAYERS = True
BUCKET = "$BUCKET"        # printed as a shell variable for the user to set


@dataclasses.dataclass(frozen=True)
class Slice:
  """A TPU v4 slice (`tpu_topology.SLICES`) and the (data, model) mesh the jobs use on it."""
  name: str
  model_parallel: int

  @property
  def chips(self) -> int:
    return tpu_topology.get_slice(self.name).chips

  @property
  def data_parallel(self) -> int:
    return self.chips // self.model_parallel


@dataclasses.dataclass(frozen=True)
class ModelSpec:
  size: str             # 'large' or 'xxl'
  attention: str        # 'mha', 'mqa', 'gqa8'
  kv_heads: Optional[int]
  gin_files: Tuple[str, ...]
  slice: Slice

  @property
  def name(self) -> str:
    return paper.model_name(self.size, self.kv_heads, sizes.t5_1_1(self.size).num_heads)


LARGE_SLICE = Slice("v4-64", model_parallel=1)
XXL_SLICE = Slice("v4-256", model_parallel=8)

MODELS = (
    ModelSpec("large", "mha", None, ("paper/models/mha_large.gin",), LARGE_SLICE),
    ModelSpec("large", "mqa", 1, ("paper/models/mqa_large.gin",), LARGE_SLICE),
    ModelSpec("large", "gqa8", 8, ("paper/models/gqa8_large.gin",), LARGE_SLICE),
    ModelSpec("xxl", "mha", None, ("paper/models/mha_xxl.gin",), XXL_SLICE),
    ModelSpec("xxl", "mqa", 1, ("paper/models/mqa_xxl.gin",), XXL_SLICE),
    ModelSpec("xxl", "gqa8", 8, ("paper/models/gqa8_xxl.gin",), XXL_SLICE),
)


@dataclasses.dataclass(frozen=True)
class MemoryPlan:
  """How a training job fits its chips: rematerialisation and gradient accumulation."""
  remat_policy: str = "none"
  num_microbatches: Optional[int] = None

  def bindings(self) -> Dict[str, Any]:
    return {"REMAT_POLICY": self.remat_policy, "NUM_MICROBATCHES": self.num_microbatches}


# The fastest setting (by the performance model's step time) whose train step, compiled by
# TPU's compiler for the job's slice, fits each chip within tpu_topology.HEADROOM_FRACTION:
# found by `gqa-t5 compile --search`, kept per (model size, inputs, targets, batch); see
# results/paper_tpu_v4/compile_jobs.md for every job's compiled figures.
MEMORY_PLANS: Dict[Tuple[str, int, int, int], MemoryPlan] = {
    # Uptraining XXL, 512/114, batch 2048 on v4-256 (16 x 8): 'none' needs 295 GiB per chip,
    # 'minimal' 58.5 GiB at 1 micro-batch and 36.8 GiB at 4; at 8, 27.2 GiB.
    ("xxl", 512, 114, 2048): MemoryPlan("minimal", 8),
    # Fine-tuning XXL at 2048/512, batch 128 (arxiv, pubmed, multi_news, mediasum): 'none'
    # needs 130.8 GiB; 'minimal' 30.0 GiB at 1 micro-batch (over the headroom), 26.7 at 2.
    ("xxl", 2048, 512, 128): MemoryPlan("minimal", 2),
    # Fine-tuning XXL at 512/256 (cnn_dailymail, wmt14_en_de): 'minimal' fits at 16.2 GiB.
    ("xxl", 512, 256, 128): MemoryPlan("minimal", 1),
    # Fine-tuning XXL at 2048/32 (trivia_qa): 'none' needs 102.1 GiB; 'minimal' with 2
    # micro-batches fits at 26.9 GiB.
    ("xxl", 2048, 32, 128): MemoryPlan("minimal", 2),
    # Uptraining Large, 512/114, batch 2048 on v4-64 (32 x 1): 'none' needs 127.1 GiB;
    # 'minimal' 37.8 GiB at 1 micro-batch, 27.6 GiB at 2.
    ("large", 512, 114, 2048): MemoryPlan("minimal", 2),
    # Fine-tuning Large at 2048/512 on v4-64: 'none' needs 81.1 GiB; 'minimal' fits at 18.5.
    ("large", 2048, 512, 128): MemoryPlan("minimal", 1),
    # Not compiled: every activation of these is smaller than at 2048/512 (same batch).
    ("large", 512, 256, 128): MemoryPlan("minimal", 1),
    ("large", 2048, 32, 128): MemoryPlan("minimal", 1),
}


# Multi-head models whose jobs need more than the grouped models' plan above (their decoder
# keeps N key/value heads: more parameters, optimizer state and key/value activations), by
# (size, inputs, targets, batch).
MHA_MEMORY_PLANS: Dict[Tuple[str, int, int, int], MemoryPlan] = {
    # MHA-XXL fine-tuning at 2048/512: 'minimal' with 2 micro-batches (GQA-8's plan, 26.7 GiB)
    # was compiled at 31.7 GiB, over the chip's 30.75; 4 micro-batches halve the activations.
    ("xxl", 2048, 512, 128): MemoryPlan("minimal", 4),
    # MHA-XXL at 2048/32: the same 2048-token encoder and cross-attention as at 2048/512 (not
    # compiled; given the 2048/512 plan).
    ("xxl", 2048, 32, 128): MemoryPlan("minimal", 4),
}


def memory_plan(size: str, lengths: Dict[str, int], batch: int, multi_head: bool = False
                ) -> MemoryPlan:
  """The memory plan of a training job: the multi-head override where there is one, else the
  plan of its size and shape, else no rematerialisation or micro-batches."""
  key = (size, lengths["inputs"], lengths["targets"], batch)
  if multi_head and key in MHA_MEMORY_PLANS:
    return MHA_MEMORY_PLANS[key]
  return MEMORY_PLANS.get(key, MemoryPlan())


@dataclasses.dataclass
class Job:
  model: ModelSpec
  kind: str                     # 'uptrain', 'finetune', 'eval'
  task: str
  gin_files: Tuple[str, ...]
  bindings: Dict[str, Any]
  entry: str                    # 'gqa_t5.train' or 'gqa_t5.eval'
  checks: List[str] = dataclasses.field(default_factory=list)
  bytes_per_chip: Dict[str, float] = dataclasses.field(default_factory=dict)

  @property
  def name(self) -> str:
    return f"{self.model.name} {self.kind}" + (f" {self.task}" if self.kind != "uptrain" else "")

  def command(self) -> str:
    parts = [f"python -m {self.entry}"] + [f"--gin_file={f}" for f in self.gin_files]
    for key, value in self.bindings.items():
      parts.append(f"--gin.{key}=\"{gin_literal(value)}\"")
    return " \\\n    ".join(parts)


def gin_literal(value: Any) -> str:
  if isinstance(value, str):
    return repr(value)
  return repr(value).replace(" ", "")


def _run_dir(model: ModelSpec, what: str) -> str:
  return f"{BUCKET}/gqa_t5/{model.size}_{model.attention}/{what}"


def uptrained_step() -> int:
  return PRETRAIN_STEPS + int(round(ALPHA * PRETRAIN_STEPS))


def build_jobs() -> List[Job]:
  jobs = []
  for model in MODELS:
    mesh = {"MODEL_PARALLEL": model.slice.model_parallel, "DATA_PARALLEL": -1}
    if model.attention == "mha":
      start, start_step = PUBLIC_CHECKPOINTS[model.size], PRETRAIN_STEPS
    else:
      start, start_step = _run_dir(model, "uptrain"), uptrained_step()
      jobs.append(Job(model, "uptrain", PRETRAIN_TASK,
                      model.gin_files + ("runs/uptrain.gin",),
                      {"MODEL_DIR": start, "INITIAL_CHECKPOINT_PATH": PUBLIC_CHECKPOINTS[
                          model.size], "MIXTURE_OR_TASK_NAME": PRETRAIN_TASK,
                       "TASK_FEATURE_LENGTHS": dict(lengths.PAPER_FEATURE_LENGTHS[
                           PRETRAIN_TASK]), "BATCH_SIZE": UPTRAIN_BATCH,
                       "TRAIN_STEPS": uptrained_step(), "KV_CONVERSION": "mean", **mesh,
                       **memory_plan(model.size, lengths.PAPER_FEATURE_LENGTHS[PRETRAIN_TASK],
                                     UPTRAIN_BATCH, model.kv_heads is None).bindings()},
                      "gqa_t5.train"))
    for task in FINETUNE_TASKS:
      tuned = _run_dir(model, f"finetune_{task}")
      jobs.append(Job(model, "finetune", task,
                      model.gin_files + (f"paper/finetune/{task}.gin",),
                      {"MODEL_DIR": tuned, "INITIAL_CHECKPOINT_PATH": start,
                       "TRAIN_STEPS": start_step + FINETUNE_STEPS, **mesh,
                       **memory_plan(model.size, lengths.PAPER_FEATURE_LENGTHS[task],
                                     FINETUNE_BATCH, model.kv_heads is None).bindings()},
                      "gqa_t5.train"))
      jobs.append(Job(model, "eval", task, model.gin_files + ("runs/eval.gin",),
                      {"MIXTURE_OR_TASK_NAME": task,
                       "TASK_FEATURE_LENGTHS": dict(lengths.PAPER_FEATURE_LENGTHS[task]),
                       "CHECKPOINT_PATH": tuned, "EVAL_OUTPUT_DIR": tuned + "/eval",
                       "SPLIT": "validation", "BATCH_SIZE": 128, **mesh}, "gqa_t5.eval"))
  return jobs


# ---- the commands ------------------------------------------------------------------------------

def header(model: ModelSpec) -> str:
  sl = model.slice
  return (f"# {model.name}: TPU {sl.name} ({sl.chips} chips), mesh data={sl.data_parallel} x "
          f"model={sl.model_parallel}")


def commands_text(jobs: List[Job]) -> str:
  lines = [
      "#!/usr/bin/env bash",
      "# The paper's runs (Ainslie et al. 2023) with gqa_t5, as checked by "
      "`gqa-t5 reproduce --preset paper --dry-run`.",
      "# Run each command on every host of the TPU slice, e.g.",
      "#   gcloud compute tpus tpu-vm ssh $TPU_NAME --zone=$ZONE --worker=all \\",
      "#     --command='cd gqa_t5 && BUCKET=gs://your-bucket <command>'",
      "# Before spending pod time, compile a job for its slice with TPU's own compiler on any",
      "# machine: add --dry_run_tpu=<slice> to its command (or run `gqa-t5 compile`; figures",
      "# of the compiled jobs are in results/paper_tpu_v4/).",
      f"# Fine-tuning runs {FINETUNE_STEPS} steps (the paper trains to convergence and keeps the",
      "# best validation checkpoint: adjust TRAIN_STEPS).",
      "set -euo pipefail",
      ": \"${BUCKET:?set BUCKET=gs://your-bucket}\"", ""]
  current = None
  for job in jobs:
    if job.model != current:
      current = job.model
      lines += ["", header(job.model)]
    lines.append(f"# {job.kind}" + (f" {job.task}" if job.kind != "uptrain" else
                                    f" (alpha={ALPHA:g}: {uptrained_step() - PRETRAIN_STEPS} "
                                    f"steps after the public checkpoint's {PRETRAIN_STEPS})"))
    lines.append(job.command())
  lines += ["", "# Decode timing (Table 1's T_infer, Fig. 6) on one host: measured greedy "
                "decoding per K,",
            "# and the roofline prediction for 8 TPU v4 chips:",
            "gqa-t5 benchmark-decode --emb-dim 1024 --num-heads 16 --head-dim 64 --mlp-dim 2816 "
            "--layers 24 --vocab 32128 --input-length 2048 --output-length 512 --batch 32 "
            "--dtype bfloat16 --kv-heads 16,8,4,2,1",
            "python scripts/simulate_paper_timing.py", ""]
  return "\n".join(lines)
