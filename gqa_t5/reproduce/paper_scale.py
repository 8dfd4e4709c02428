"""`gqa-t5 reproduce --preset paper --dry-run`: the paper's runs at full scale, checked here.

For T5.1.1-Large and -XXL with MHA, MQA and GQA-8 it builds every job the paper ran (uptraining
from the public T5X checkpoint at alpha = 0.05, fine-tuning on the seven TFDS/seqio tasks with
the paper's settings, greedy evaluation on the validation split), and checks each without
weights or data:
  * the gin files parse with every REQUIRED macro set, and configure the expected model;
  * the tasks are registered and their lengths are the paper's;
  * the public checkpoint's T5.1.1 tensors (shapes only), mean-pooled by the converter where the
    model is grouped, match the model's parameters (`jax.eval_shape`, nothing allocated);
  * every parameter and optimizer-state tensor splits evenly over a TPU v4 mesh
    (`jax.sharding.AbstractMesh`: no TPU needed), with the bytes each chip holds;
  * the batch splits over the mesh's data axis;
  * the decoding caches at the paper's timing lengths have the bytes the roofline model of
    `scripts/simulate_paper_timing.py` assumes;
then prints the commands to launch on the pod.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Any, Callable, Dict, List, Optional, Tuple

PUBLIC_CHECKPOINTS = {
    "large": "gs://t5-data/pretrained_models/t5x/t5_1_1_large/checkpoint_1000000",
    "xxl": "gs://t5-data/pretrained_models/t5x/t5_1_1_xxl/checkpoint_1000000",
}
PRETRAIN_STEPS = 1_000_000
ALPHA = 0.05
UPTRAIN_BATCH = 2048
FINETUNE_STEPS = 50_000   # the paper fine-tunes to convergence; a budget to adjust
FINETUNE_TASKS = ("cnn_dailymail", "arxiv", "pubmed", "mediasum", "multi_news",
                  "wmt14_en_de", "trivia_qa")
PRETRAIN_TASK = "c4_span_corruption"
TPU_V4_HBM_BYTES = 32 * 2 ** 30
BUCKET = "$BUCKET"        # printed as a shell variable for the user to set


@dataclasses.dataclass(frozen=True)
class Slice:
  """A TPU v4 slice and the (data, model) mesh the jobs use on it."""
  name: str
  chips: int
  model_parallel: int

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
    label = {"mha": "MHA", "mqa": "MQA", "gqa8": "GQA-8"}[self.attention]
    return f"{label}-{'Large' if self.size == 'large' else 'XXL'}"


LARGE_SLICE = Slice("v4-64", chips=32, model_parallel=1)
XXL_SLICE = Slice("v4-256", chips=128, model_parallel=8)

MODELS = (
    ModelSpec("large", "mha", None, ("paper/models/mha_large.gin",), LARGE_SLICE),
    ModelSpec("large", "mqa", 1, ("t5_1_1/large.gin", "attention/mqa.gin"), LARGE_SLICE),
    ModelSpec("large", "gqa8", 8, ("t5_1_1/large.gin", "attention/gqa_8.gin"), LARGE_SLICE),
    ModelSpec("xxl", "mha", None, ("paper/models/mha_xxl.gin",), XXL_SLICE),
    ModelSpec("xxl", "mqa", 1, ("paper/models/mqa_xxl.gin",), XXL_SLICE),
    ModelSpec("xxl", "gqa8", 8, ("paper/models/gqa8_xxl.gin",), XXL_SLICE),
)


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
      parts.append(f"--gin.{key}=\"{_gin_literal(value)}\"")
    return " \\\n    ".join(parts)


def _gin_literal(value: Any) -> str:
  if isinstance(value, str):
    return repr(value)
  return repr(value).replace(" ", "")


def _run_dir(model: ModelSpec, what: str) -> str:
  return f"{BUCKET}/gqa_t5/{model.size}_{model.attention}/{what}"


def _uptrained_step() -> int:
  return PRETRAIN_STEPS + int(round(ALPHA * PRETRAIN_STEPS))


def build_jobs() -> List[Job]:
  from gqa_t5.tasks import lengths  # pylint: disable=g-import-not-at-top
  jobs = []
  for model in MODELS:
    mesh = {"MODEL_PARALLEL": model.slice.model_parallel, "DATA_PARALLEL": -1}
    if model.attention == "mha":
      start, start_step = PUBLIC_CHECKPOINTS[model.size], PRETRAIN_STEPS
    else:
      start, start_step = _run_dir(model, "uptrain"), _uptrained_step()
      jobs.append(Job(model, "uptrain", PRETRAIN_TASK,
                      model.gin_files + ("runs/uptrain.gin",),
                      {"MODEL_DIR": start, "INITIAL_CHECKPOINT_PATH": PUBLIC_CHECKPOINTS[
                          model.size], "MIXTURE_OR_TASK_NAME": PRETRAIN_TASK,
                       "TASK_FEATURE_LENGTHS": dict(lengths.PAPER_FEATURE_LENGTHS[
                           PRETRAIN_TASK]), "BATCH_SIZE": UPTRAIN_BATCH,
                       "TRAIN_STEPS": _uptrained_step(), "KV_CONVERSION": "mean", **mesh},
                      "gqa_t5.train"))
    for task in FINETUNE_TASKS:
      tuned = _run_dir(model, f"finetune_{task}")
      jobs.append(Job(model, "finetune", task,
                      model.gin_files + (f"paper/finetune/{task}.gin",),
                      {"MODEL_DIR": tuned, "INITIAL_CHECKPOINT_PATH": start,
                       "TRAIN_STEPS": start_step + FINETUNE_STEPS, **mesh}, "gqa_t5.train"))
      jobs.append(Job(model, "eval", task, model.gin_files + ("runs/eval.gin",),
                      {"MIXTURE_OR_TASK_NAME": task,
                       "TASK_FEATURE_LENGTHS": dict(lengths.PAPER_FEATURE_LENGTHS[task]),
                       "CHECKPOINT_PATH": tuned, "EVAL_OUTPUT_DIR": tuned + "/eval",
                       "SPLIT": "validation", "BATCH_SIZE": 128, **mesh}, "gqa_t5.eval"))
  return jobs


# ---- checks ------------------------------------------------------------------------------------

class DryRunError(ValueError):
  """A paper-scale configuration that would fail on the pod."""


def _expected_config(model: ModelSpec, dropout: float):
  from gqa_t5.model.config import T5Config  # pylint: disable=g-import-not-at-top
  dims = {"large": dict(emb_dim=1024, num_heads=16, head_dim=64, mlp_dim=2816),
          "xxl": dict(emb_dim=4096, num_heads=64, head_dim=64, mlp_dim=10240)}[model.size]
  return T5Config(vocab_size=32128, dtype="bfloat16", num_encoder_layers=24,
                  num_decoder_layers=24, dropout_rate=dropout, num_kv_heads=model.kv_heads,
                  num_cross_kv_heads=model.kv_heads, **dims)


class _Abstract:
  """Abstract parameters, axes and per-chip bytes of one model config (computed once)."""

  def __init__(self):
    self._cache: Dict[Any, Dict[str, Any]] = {}

  def get(self, model, config) -> Dict[str, Any]:
    key = config.replace(dropout_rate=0.0)
    if key not in self._cache:
      import jax  # pylint: disable=g-import-not-at-top
      from gqa_t5 import partitioning  # pylint: disable=g-import-not-at-top
      variables = jax.eval_shape(
          lambda rng: model.get_initial_variables(
              rng, {"encoder_input_tokens": (1, 8), "decoder_input_tokens": (1, 8)}),
          jax.random.PRNGKey(0))
      self._cache[key] = {"params": variables["params"],
                          "axes": partitioning.params_logical_axes(variables["params_axes"])}
    return self._cache[key]


def _flat(tree) -> Dict[str, Any]:
  from gqa_t5.checkpoints import tree as tree_lib  # pylint: disable=g-import-not-at-top
  import flax  # pylint: disable=g-import-not-at-top
  return tree_lib.flatten(flax.core.unfreeze(tree))


def check_conversion(model: ModelSpec, config, abstract_params) -> str:
  """The public MHA checkpoint's tensors, converted as uptraining converts them, fit the model."""
  from gqa_t5.checkpoints import initial as initial_checkpoint  # pylint: disable=g-import-not-at-top
  from gqa_t5.checkpoints import lazy, source as source_lib  # pylint: disable=g-import-not-at-top
  from gqa_t5.checkpoints import tree as tree_lib  # pylint: disable=g-import-not-at-top
  from gqa_t5.convert import converter  # pylint: disable=g-import-not-at-top

  def never(name):
    def read():
      raise DryRunError(f"the dry run must not read tensor {name}")
    return read

  mha = config.replace(num_kv_heads=None, num_cross_kv_heads=None)
  shapes = tree_lib.expected_shapes(mha)
  tree_lib.validate_shapes(shapes, mha, source=PUBLIC_CHECKPOINTS[model.size])
  tensors = {n: lazy.LazyTensor(n, s, "float32", never(n)) for n, s in shapes.items()}
  source = source_lib.CheckpointSource(PUBLIC_CHECKPOINTS[model.size], "t5x", tensors,
                                       PRETRAIN_STEPS, mha)
  changed = ()
  if model.kv_heads is not None:
    spec = converter.ConversionSpec(num_kv_heads=model.kv_heads, method="mean")
    out, out_config, changed = converter.plan(source, spec)
    source = dataclasses.replace(source, tensors=out, config=out_config)
  try:
    initial_checkpoint.check_against(source, abstract_params)
  except initial_checkpoint.InitialCheckpointError as error:
    raise DryRunError(str(error)) from None
  return (f"{len(shapes)} tensors of the public checkpoint"
          + (f", {len(changed)} mean-pooled to K={model.kv_heads}," if changed else "")
          + " match the model's parameters")


def check_shardings(job: Job, trainer_kwargs: Dict[str, Any], abstract: Dict[str, Any],
                    config) -> Tuple[str, Dict[str, float]]:
  """Every parameter and Adafactor state tensor splits evenly over the slice's mesh."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from jax.sharding import AbstractMesh, NamedSharding  # pylint: disable=g-import-not-at-top
  from gqa_t5 import partitioning  # pylint: disable=g-import-not-at-top
  from gqa_t5 import trainer as train_state  # pylint: disable=g-import-not-at-top
  sl = job.model.slice
  partitioner = trainer_kwargs["partitioner"]
  if partitioner.model_parallel != sl.model_parallel:
    raise DryRunError(f"{job.name}: the gin files set MODEL_PARALLEL="
                      f"{partitioner.model_parallel}, the {sl.name} plan needs "
                      f"{sl.model_parallel}")
  mesh = AbstractMesh((sl.data_parallel, sl.model_parallel),
                      (partitioning.DATA, partitioning.MODEL))
  rules = partitioning.standard_logical_axis_rules(
      config.self_attention_kv_heads, config.cross_attention_kv_heads, sl.model_parallel)
  layout = partitioning.Partitioner(rules=rules)
  optimizer = trainer_kwargs.get("optimizer")
  params, axes = abstract["params"], abstract["axes"]
  trees = {"params": (params, axes)}
  if optimizer is not None:
    state = jax.eval_shape(lambda p: train_state.create(p, optimizer.transform(axes)), params)
    state_axes = train_state.logical_axes(optimizer, params, axes)
    trees["optimizer"] = (state.opt_state.stats, state_axes.opt_state.stats)
  totals = {}
  for what, (values, logical) in trees.items():
    flat_values, flat_axes = _flat(values), _flat_axes(logical)
    total = 0.0
    for name, value in flat_values.items():
      spec = layout.logical_to_spec(flat_axes[name])
      try:
        shard = NamedSharding(mesh, spec).shard_shape(tuple(value.shape))
      except ValueError as error:
        raise DryRunError(f"{job.name}: {what} tensor {name} {tuple(value.shape)} does not "
                          f"split over mesh (data={sl.data_parallel}, model="
                          f"{sl.model_parallel}) with spec {spec}: {error}") from None
      total += float(np.prod(shard, dtype=np.float64)) * np.dtype(value.dtype).itemsize
    totals[what] = total
  used = sum(totals.values())
  if used > TPU_V4_HBM_BYTES:
    raise DryRunError(f"{job.name}: parameters and optimizer state need "
                      f"{used / 2 ** 30:.1f} GiB per chip, over the {TPU_V4_HBM_BYTES / 2 ** 30:.0f}"
                      f" GiB of a TPU v4 chip")
  kv = partitioning.describe_kv_layout(config, sl.model_parallel)
  return (f"{sl.name} mesh data={sl.data_parallel} x model={sl.model_parallel}: "
          + ", ".join(f"{k} {_gib(v)}" for k, v in totals.items())
          + f" per chip; {kv}"), totals


def _flat_axes(tree) -> Dict[str, Tuple]:
  out = {}

  def walk(node, prefix):
    for key, value in node.items():
      name = f"{prefix}/{key}" if prefix else str(key)
      if isinstance(value, dict) or hasattr(value, "items"):
        walk(value, name)
      else:
        out[name] = tuple(value)
  walk(tree, "")
  return out


def check_decode_cache(model_obj, config) -> str:
  """The decoding cache at the paper's timing lengths matches the roofline model's bytes."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from gqa_t5.reproduce import roofline  # pylint: disable=g-import-not-at-top
  setup = roofline.Setup()
  s, t = setup.input_length, setup.output_length

  def make(params):
    return model_obj.module.apply(
        {"params": params}, jnp.ones((1, s), jnp.int32), jnp.ones((1, t), jnp.int32),
        jnp.ones((1, t), jnp.int32), decode=True, enable_dropout=False, mutable=["cache"])[1]

  abstract_params = jax.eval_shape(
      lambda rng: model_obj.get_initial_variables(
          rng, {"encoder_input_tokens": (1, 8), "decoder_input_tokens": (1, 8)}),
      jax.random.PRNGKey(0))["params"]
  cache = jax.eval_shape(make, abstract_params)
  flat = _flat(cache)
  kv_bytes = sum(float(np.prod(v.shape)) * np.dtype(v.dtype).itemsize
                 for n, v in flat.items() if n.endswith(("cached_key", "cached_value")))
  shape = roofline.ModelShape(config.num_heads and "model", config.emb_dim, config.num_heads,
                              config.head_dim, config.mlp_dim, config.num_encoder_layers,
                              config.num_decoder_layers, config.vocab_size,
                              config.self_attention_kv_heads)
  expected = sum(roofline.cache_bytes_per_sample(shape, setup).values())
  if abs(kv_bytes - expected) > 1e-6 * expected:
    raise DryRunError(f"decode cache of {config.self_attention_kv_heads} key/value heads: "
                      f"{kv_bytes:.0f} bytes per sample, the roofline model assumes "
                      f"{expected:.0f}")
  return (f"decode cache at input {s} / output {t}: {kv_bytes / 2 ** 20:.1f} MiB per sample, "
          f"as the roofline model assumes")


def check_job(job: Job, abstract: _Abstract) -> Job:
  import gin  # pylint: disable=g-import-not-at-top
  from gqa_t5 import eval as evaluation  # pylint: disable=g-import-not-at-top
  from gqa_t5 import gin_utils  # pylint: disable=g-import-not-at-top
  from gqa_t5 import input_pipeline  # pylint: disable=g-import-not-at-top
  from gqa_t5 import partitioning  # pylint: disable=g-import-not-at-top
  from gqa_t5 import train as train_loop  # pylint: disable=g-import-not-at-top
  from gqa_t5.tasks import lengths  # pylint: disable=g-import-not-at-top
  bindings = [f"{k}={_gin_literal(v)}" for k, v in job.bindings.items()]
  try:
    gin_utils.parse(job.gin_files, bindings)
  except gin_utils.GinConfigError as error:
    raise DryRunError(f"{job.name}: {error}") from None
  target = train_loop.train if job.entry == "gqa_t5.train" else evaluation.evaluate
  kwargs = gin.get_bindings(target)
  job.checks.append(f"gin: {' + '.join(job.gin_files)} parse, every REQUIRED macro set")
  model = kwargs["model"]
  config = model.module.config
  dropout = 0.1 if job.kind == "finetune" else 0.0
  expected = _expected_config(job.model, dropout)
  if config != expected:
    diffs = [f"{f.name}={getattr(config, f.name)!r} (expected {getattr(expected, f.name)!r})"
             for f in dataclasses.fields(config)
             if getattr(config, f.name) != getattr(expected, f.name)]
    raise DryRunError(f"{job.name}: the gin files configure a different model: "
                      + ", ".join(diffs))
  job.checks.append(f"model: T5.1.1-{job.model.size.upper()}, K={config.self_attention_kv_heads}"
                    f", dropout {config.dropout_rate:g}, {config.dtype} activations")
  datasets = [v for k, v in kwargs.items() if isinstance(v, input_pipeline.DatasetConfig)]
  for cfg in datasets:
    input_pipeline.get_task(cfg)
    want = dict(lengths.PAPER_FEATURE_LENGTHS[job.task])
    if dict(cfg.task_feature_lengths) != want:
      raise DryRunError(f"{job.name}: {cfg.mixture_or_task_name} lengths "
                        f"{dict(cfg.task_feature_lengths)}, the paper's are {want}")
  batch = datasets[0].batch_size
  job.checks.append(f"task {job.task} registered, lengths {datasets[0].task_feature_lengths}, "
                    f"batch {batch}")
  sl = job.model.slice
  partitioning.validate(config, (sl.data_parallel, sl.model_parallel), batch,
                        kwargs.get("num_microbatches"))
  shapes = abstract.get(model, config)
  job.checks.append(check_conversion(job.model, config, shapes["params"])
                    if job.kind == "uptrain" or (job.kind == "finetune"
                                                 and job.model.attention == "mha")
                    else "parameters: same tree as the uptrained checkpoint")
  text, totals = check_shardings(job, kwargs, shapes, config)
  job.checks.append(text)
  job.bytes_per_chip = totals
  if kwargs.get("initial_checkpoint_path") not in (None, job.bindings.get(
      "INITIAL_CHECKPOINT_PATH")):
    raise DryRunError(f"{job.name}: INITIAL_CHECKPOINT_PATH did not reach the trainer")
  return job


# ---- the command --------------------------------------------------------------------------------

def _header(model: ModelSpec) -> str:
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
      "# First add --dry_run to a command to compile its step on the slice and print the",
      "# memory each chip needs (activations included), before spending pod time.",
      f"# Fine-tuning runs {FINETUNE_STEPS} steps (the paper trains to convergence and keeps the",
      "# best validation checkpoint: adjust TRAIN_STEPS).",
      "set -euo pipefail",
      ": \"${BUCKET:?set BUCKET=gs://your-bucket}\"", ""]
  current = None
  for job in jobs:
    if job.model != current:
      current = job.model
      lines += ["", _header(job.model)]
    lines.append(f"# {job.kind}" + (f" {job.task}" if job.kind != "uptrain" else
                                    f" (alpha={ALPHA:g}: {_uptrained_step() - PRETRAIN_STEPS} "
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


def _gib(n: float) -> str:
  return f"{n / 2 ** 30:.2f} GiB" if n >= 2 ** 28 else f"{n / 2 ** 20:.1f} MiB"


def dry_run(out: Optional[str] = None, log: Callable[[str], None] = print,
            jobs: Optional[List[Job]] = None) -> int:
  """Checks every paper-scale job; prints the results and the commands. Returns 0 or 2."""
  start = time.perf_counter()
  import gqa_t5.tasks  # pylint: disable=g-import-not-at-top,unused-import  # registers them
  jobs = build_jobs() if jobs is None else jobs
  abstract = _Abstract()
  failures = []
  current = None
  shown = set()
  for job in jobs:
    if job.model != current:
      current = job.model
      shown = set()
      log(_header(job.model)[2:])
    try:
      check_job(job, abstract)
      if job.kind != "eval":
        model = _model_for(job)
        if not any(c.startswith("decode cache") for j in jobs if j.model == job.model
                   for c in j.checks):
          job.checks.append(check_decode_cache(model, model.module.config))
      log(f"  OK   {job.name}: {job.checks[0][5:]}")
      for line in job.checks[1:]:
        if line not in shown:  # each model's shared checks once
          shown.add(line)
          log(f"         {line}")
    except (DryRunError, ValueError, KeyError) as error:
      failures.append((job, str(error)))
      log(f"  FAIL {job.name}: {error}")
  log("")
  text = commands_text(jobs)
  log(text)
  summary = {"jobs": [{"name": j.name, "kind": j.kind, "task": j.task,
                       "gin_files": list(j.gin_files), "bindings": j.bindings,
                       "checks": j.checks, "bytes_per_chip": j.bytes_per_chip,
                       "command": j.command()} for j in jobs],
             "failures": [{"job": j.name, "error": e} for j, e in failures],
             "seconds": time.perf_counter() - start}
  if out:
    os.makedirs(out, exist_ok=True)
    for name, content in (("paper_commands.sh", text),
                          ("paper_dry_run.json", json.dumps(summary, indent=2))):
      path = os.path.join(out, name)
      with open(path + ".tmp", "w") as f:
        f.write(content)
      os.replace(path + ".tmp", path)
      log(f"wrote {path}")
  log(f"{len(jobs) - len(failures)} of {len(jobs)} paper-scale jobs check out "
      f"({summary['seconds']:.0f} s; no weights, data or TPU were used)")
  return 2 if failures else 0


def _model_for(job: Job):
  import gin  # pylint: disable=g-import-not-at-top
  from gqa_t5 import eval as evaluation, train as train_loop  # pylint: disable=g-import-not-at-top
  target = train_loop.train if job.entry == "gqa_t5.train" else evaluation.evaluate
  return gin.get_bindings(target)["model"]
