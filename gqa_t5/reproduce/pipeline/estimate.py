"""Expected seconds of each stage, from FLOPs and an assumed machine: the "(expected ~X s)" of
every progress line, the overall ETA, and the `gpu` preset's computed run time.

A stage costs a start-up (data pipeline, tracing) and a compilation (mostly a persistent-cache
hit after the first stage of a shape) plus its arithmetic, counted by the one performance model
(`gqa_t5/perf_model.py`): a training step's FLOPs (`train_step_flops`: the forward, the backward
at twice it), a forward pass's (`train_forward_flops`: the encoder's weights on the input
tokens, the decoder's on the target tokens, the attention products), and a fixed time per greedy
decode step (small models decode latency-bound). The paper-shape timing stage costs its roofline
time on the machine at an assumed fraction of it, plus compilation per K. Pure arithmetic:
nothing is measured here.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Dict, List, Tuple

from gqa_t5 import perf_model
from gqa_t5.model.config import T5Config
from gqa_t5.reproduce.pipeline import presets as presets_lib
from gqa_t5.reproduce.pipeline import stage_table


@dataclasses.dataclass(frozen=True)
class Machine:
  """What a stage estimate assumes about the machine."""
  name: str
  peak_flops: float        # dense matmul peak of the preset's dtype, FLOP/s
  mfu: float               # the fraction of it training sustains
  stage_start_s: float     # per stage: start-up (data pipeline, tracing, checkpoint I/O)
  compile_s: float         # per jitted program of a stage (persistent-cache hits averaged in)
  decode_step_s: float     # one greedy decode step of the preset's small model, whole batch
  hbm_bytes_per_s: float = 0.0
  big_compile_s: float = 0.0  # per K of the paper-shape timing (a 24-layer model)

  @property
  def flops_per_s(self) -> float:
    return self.peak_flops * self.mfu


MACHINES = {
    # The model FLOPs per second, and the per-stage start-up and compile costs, fitted to a
    # quick run on a 2-core x86-64 CPU (430 s of stages, 2026-12-04; at these sizes a step's
    # overheads, not its arithmetic, set the rate). A test holds the estimate within 15% of
    # the committed results/quick.
    "cpu": Machine("2-core x86-64 CPU", peak_flops=2.1e10, mfu=1.0, stage_start_s=1.6,
                   compile_s=1.6, decode_step_s=0.004),
    # perf_model.H200's dense bf16 peak and HBM; 30% MFU as the conservative assumption.
    "h200": Machine("one NVIDIA H200", peak_flops=perf_model.H200.peak_flops, mfu=0.30,
                    stage_start_s=1.5, compile_s=1.5, decode_step_s=0.004,
                    hbm_bytes_per_s=perf_model.H200.hbm_bytes_per_s, big_compile_s=10.0),
}
PAPER_TIMING_EFFICIENCY = 0.5  # measured decode reaches about half the roofline (assumed)


def forward_flops(config: T5Config, inputs: int, targets: int) -> float:
  """FLOPs of one example's forward pass (targets 0: the encoder alone)."""
  return sum(perf_model.train_forward_flops(config, inputs, targets).values())


def train_seconds(machine: Machine, config: T5Config, steps: int, batch: int,
                  lengths: Dict[str, int]) -> float:
  flops = perf_model.train_step_flops(config, batch=batch, input_length=lengths["inputs"],
                                      target_length=lengths["targets"])
  return machine.stage_start_s + machine.compile_s + steps * flops / machine.flops_per_s


def convert_seconds(machine: Machine, config: T5Config) -> float:
  # Read, pool and write float32 weights at about 1 GB/s.
  return machine.stage_start_s + perf_model.total_params(config) * 4 * 3 / 1e9


def probe_seconds(machine: Machine, config: T5Config, batches: int, batch: int,
                  lengths: Dict[str, int]) -> float:
  flops = batches * batch * forward_flops(config, lengths["inputs"], lengths["targets"])
  return machine.stage_start_s + machine.compile_s + flops / machine.flops_per_s


def eval_seconds(machine: Machine, config: T5Config, targets_lengths: Dict[str, int],
                 examples: int, batch: int, inputs_length: int) -> float:
  """Per task: greedy decoding (its encoder pass, then a fixed time per step) and the
  teacher-forced loss of the same examples (a forward pass)."""
  batches = math.ceil(examples / batch)
  decode = sum(batches * t * machine.decode_step_s for t in targets_lengths.values())
  flops = sum(examples * (forward_flops(config, inputs_length, 0)
                          + forward_flops(config, inputs_length, t))
              for t in targets_lengths.values())
  return (machine.stage_start_s + machine.compile_s * len(targets_lengths) + decode
          + flops / machine.flops_per_s)


def timing_seconds(machine: Machine, config: T5Config, num_kv: int, batch: int,
                   input_length: int, output_length: int, repeats: int) -> float:
  encode = batch * forward_flops(config, input_length, 0) / machine.flops_per_s
  per_run = encode + output_length * machine.decode_step_s * max(1.0, batch / 32)
  return machine.stage_start_s + num_kv * (2 * machine.compile_s + (repeats + 1) * per_run)


def paper_timing_seconds(machine: Machine, config: T5Config, kv_heads, batch: int,
                         input_length: int, output_length: int, repeats: int) -> float:
  """Roofline time of (repeats + 1) batches per K on this machine, at PAPER_TIMING_EFFICIENCY."""
  if machine.hbm_bytes_per_s <= 0:  # a CPU smoke run of a tiny shape: like `timing`
    return timing_seconds(machine, config, len(kv_heads), batch, input_length, output_length,
                          repeats)
  chip = perf_model.Chip(machine.name, machine.hbm_bytes_per_s, machine.peak_flops)
  setup = perf_model.Setup(chips=1, model_parallel=1, max_batch_per_chip=batch,
                         input_length=input_length, output_length=output_length)
  total = machine.stage_start_s
  for k in kv_heads:
    per_sample = perf_model.time_per_sample(config.replace(num_kv_heads=k), setup, chip,
                                            batch_per_chip=batch)["total"]
    total += machine.big_compile_s + (repeats + 1) * batch * per_sample / (
        PAPER_TIMING_EFFICIENCY)
  return total


def stage_seconds(stage: stage_table.Stage, preset: presets_lib.ReproducePreset,
                  config: T5Config, machine: Machine, lengths: Dict[str, int]) -> float:
  """The expected seconds of one row of the stage table, by its kind.

  config: the run's multi-head model (the vocabulary set); lengths: pretraining's."""
  p = preset
  if stage.kind in ("pretrain", "uptrain"):
    return train_seconds(machine, config, stage.steps, p.pretrain_batch, lengths)
  if stage.kind == "finetune":
    finetune_lengths = {"inputs": p.inputs_length, "targets": max(p.targets_lengths.values())}
    return train_seconds(machine, config, stage.steps, p.finetune_batch, finetune_lengths)
  if stage.kind == "convert":
    return convert_seconds(machine, config)
  if stage.kind == "probe":
    return probe_seconds(machine, config, p.probe_batches, p.pretrain_batch, lengths)
  if stage.kind == "eval":
    return eval_seconds(machine, config, p.targets_lengths, p.eval_examples, p.eval_batch,
                        p.inputs_length)
  if stage.kind == "timing":
    return timing_seconds(machine, config, len(p.timing_kv_heads()), p.timing_batch,
                          p.timing_input_length, p.timing_output_length, p.timing_repeats)
  if stage.kind == "paper-timing":
    return sum(paper_timing_seconds(machine, t.config(), t.kv_heads, t.batch, t.input_length,
                                    t.output_length, t.repeats)
               for t in p.paper_timing)
  raise ValueError(f"stage {stage.name}: no cost function for kind {stage.kind!r}")


def expected_seconds(preset: presets_lib.ReproducePreset, config: T5Config, machine: Machine,
                     lengths: Dict[str, int]) -> List[Tuple[str, float]]:
  """(name, expected seconds) of every row of the preset's stage table, in its order."""
  return [(stage.name, stage_seconds(stage, preset, config, machine, lengths))
          for stage in stage_table.stage_table(preset, config.num_heads)]


def format_seconds(seconds: float) -> str:
  seconds = max(0, int(round(seconds)))
  if seconds < 90:
    return f"{seconds} s"
  minutes, secs = divmod(seconds, 60)
  if minutes < 60:
    return f"{minutes}:{secs:02d} min"
  hours, minutes = divmod(minutes, 60)
  return f"{hours}:{minutes:02d}:{secs:02d} h"
