"""The checks of one paper-scale job, without weights, data or a TPU:
  * gin: the files parse with every REQUIRED macro set and configure the expected model;
  * tasks: registered, with the paper's lengths; the batch splits over the mesh's data axis;
  * conversion: the public checkpoint's T5.1.1 tensors (shapes only), mean-pooled where the
    model is grouped, match the model's abstract parameters;
  * shardings: every parameter and optimizer-state tensor splits evenly over the TPU v4 mesh
    (`jax.sharding.AbstractMesh`), and fits a chip's HBM;
  * decode cache: its bytes at the paper's timing lengths are the performance model's.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Dict, Tuple

import flax
import gin
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AbstractMesh, NamedSharding

from gqa_t5 import aot
from gqa_t5 import eval as eval_lib
from gqa_t5 import gin_utils
from gqa_t5 import input_pipeline
from gqa_t5 import partitioning
from gqa_t5 import perf_model
from gqa_t5 import train as train_lib
from gqa_t5 import trainer
from gqa_t5 import initial_checkpoint
from gqa_t5.checkpoints import lazy
from gqa_t5.checkpoints import scanned
from gqa_t5.checkpoints import source as source_lib
from gqa_t5.checkpoints import tree as tree_lib
from gqa_t5.convert import converter
from gqa_t5.model import sizes
from gqa_t5.reproduce.paper_scale import jobs as jobs_lib
from gqa_t5.tasks import lengths


class DryRunError(ValueError):
  """A paper-scale configuration that would fail on the pod."""


def expected_config(model: jobs_lib.ModelSpec, dropout: float, remat_policy: str = "none"):
  """The T5Config a job's gin files must configure (sizes.py's T5.1.1 table, scanned as
  gin/paper/models/*.gin run it, with the job's rematerialisation)."""
  return sizes.t5_1_1(model.size, dropout_rate=dropout, num_kv_heads=model.kv_heads,
                      num_cross_kv_heads=model.kv_heads, scan_layers=jobs_lib.SCAN_LAYERS,
                      remat_policy=remat_policy)


class AbstractParams:
  """Abstract parameters and logical axes of each model config (computed once per config)."""

  def __init__(self):
    self._cache: Dict[Any, Dict[str, Any]] = {}

  def get(self, model, config) -> Dict[str, Any]:
    key = config.replace(dropout_rate=0.0)
    if key not in self._cache:
      params, axes = partitioning.abstract_params_and_axes(model)
      self._cache[key] = {"params": params, "axes": axes}
    return self._cache[key]


def _flat(tree) -> Dict[str, Any]:
  return tree_lib.flatten(flax.core.unfreeze(tree))


def _flat_axes(tree) -> Dict[str, Tuple]:
  return {name: tuple(axes) for name, axes in _flat(tree).items()}


def check_conversion(model: jobs_lib.ModelSpec, config, abstract_params) -> str:
  """The public MHA checkpoint's tensors, converted as uptraining converts them, fit the model."""

  def never(name):
    def read():
      raise DryRunError(f"the dry run must not read tensor {name}")
    return read

  public = jobs_lib.PUBLIC_CHECKPOINTS[model.size]
  # The public checkpoint: multi-head, unrolled layers.
  mha = config.replace(num_kv_heads=None, num_cross_kv_heads=None, scan_layers=False,
                       remat_policy="none")
  shapes = tree_lib.expected_shapes(mha)
  tree_lib.validate_shapes(shapes, mha, source=public)
  tensors = {n: lazy.LazyTensor(n, s, "float32", never(n)) for n, s in shapes.items()}
  source = source_lib.CheckpointSource(public, "t5x", tensors, jobs_lib.PRETRAIN_STEPS, mha)
  changed = ()
  if model.kv_heads is not None:
    spec = converter.ConversionSpec(num_kv_heads=model.kv_heads, method="mean")
    out, out_config, changed = converter.plan(source, spec)
    source = dataclasses.replace(source, tensors=out, config=out_config)
  if config.scan_layers:
    # As `initial_checkpoint.open_for_model` does on load: the unrolled layers stacked for a scanned model.
    source = dataclasses.replace(source, tensors=scanned.stack(source.tensors))
  try:
    initial_checkpoint.check_against(source, abstract_params)
  except initial_checkpoint.InitialCheckpointError as error:
    raise DryRunError(str(error)) from None
  return (f"{len(shapes)} tensors of the public checkpoint"
          + (f", {len(changed)} mean-pooled to K={model.kv_heads}," if changed else "")
          + " match the model's parameters")


def _trees(optimizer, params, axes) -> Dict[str, Tuple[Any, Any]]:
  trees = {"params": (params, axes)}
  if optimizer is not None:
    state = jax.eval_shape(lambda p: trainer.create(p, optimizer.transform(axes)), params)
    state_axes = trainer.logical_axes(optimizer, params, axes)
    trees["optimizer"] = (state.opt_state.stats, state_axes.opt_state.stats)
  return trees


def check_shardings(job: jobs_lib.Job, trainer_kwargs: Dict[str, Any], abstract: Dict[str, Any],
                    config) -> Tuple[str, Dict[str, float]]:
  """Every parameter and Adafactor state tensor splits evenly over the slice's mesh."""
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
  totals = {}
  for what, (values, logical) in _trees(trainer_kwargs.get("optimizer"), abstract["params"],
                                        abstract["axes"]).items():
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
  available = perf_model.TPU_V4.available_bytes
  if used > available:
    raise DryRunError(f"{job.name}: parameters and optimizer state need "
                      f"{used / 2 ** 30:.1f} GiB per chip, over the "
                      f"{available / 2 ** 30:.2f} GiB of a {perf_model.TPU_V4.name} chip")
  kv = partitioning.describe_kv_layout(config, sl.model_parallel)
  return (f"{sl.name} mesh data={sl.data_parallel} x model={sl.model_parallel}: "
          + ", ".join(f"{k} {aot.gib(v)}" for k, v in totals.items())
          + f" per chip; {kv}"), totals


def check_decode_cache(model_obj, config) -> str:
  """The decoding cache at the paper's timing lengths matches the performance model's bytes."""
  setup = perf_model.Setup()
  s, t = setup.input_length, setup.output_length

  def make(params):
    return model_obj.module.apply(
        {"params": params}, jnp.ones((1, s), jnp.int32), jnp.ones((1, t), jnp.int32),
        jnp.ones((1, t), jnp.int32), decode=True, enable_dropout=False, mutable=["cache"])[1]

  abstract_params, _ = partitioning.abstract_params_and_axes(model_obj)
  flat = _flat(jax.eval_shape(make, abstract_params))
  kv_bytes = sum(float(np.prod(v.shape)) * np.dtype(v.dtype).itemsize
                 for n, v in flat.items() if n.endswith(("cached_key", "cached_value")))
  expected = sum(perf_model.cache_bytes(config, s, t, setup.bytes_per_value).values())
  if abs(kv_bytes - expected) > 1e-6 * expected:
    raise DryRunError(f"decode cache of {config.self_attention_kv_heads} key/value heads: "
                      f"{kv_bytes:.0f} bytes per sample, the performance model assumes "
                      f"{expected:.0f}")
  return (f"decode cache at input {s} / output {t}: {kv_bytes / 2 ** 20:.1f} MiB per sample, "
          f"as the performance model assumes")


def entry_point(job: jobs_lib.Job):
  return train_lib.train if job.entry == "gqa_t5.train" else eval_lib.evaluate


def _check_model(job: jobs_lib.Job, config) -> None:
  expected = expected_config(job.model, 0.1 if job.kind == "finetune" else 0.0,
                             job.bindings.get("REMAT_POLICY") or "none")
  if config != expected:
    diffs = [f"{f.name}={getattr(config, f.name)!r} (expected {getattr(expected, f.name)!r})"
             for f in dataclasses.fields(config)
             if getattr(config, f.name) != getattr(expected, f.name)]
    raise DryRunError(f"{job.name}: the gin files configure a different model: "
                      + ", ".join(diffs))
  job.checks.append(f"model: T5.1.1-{job.model.size.upper()}, K={config.self_attention_kv_heads}"
                    f", dropout {config.dropout_rate:g}, {config.dtype} activations")


def _check_datasets(job: jobs_lib.Job, kwargs: Dict[str, Any]) -> int:
  datasets = [v for v in kwargs.values() if isinstance(v, input_pipeline.DatasetConfig)]
  for cfg in datasets:
    input_pipeline.get_task(cfg)
    want = dict(lengths.PAPER_FEATURE_LENGTHS[job.task])
    if dict(cfg.task_feature_lengths) != want:
      raise DryRunError(f"{job.name}: {cfg.mixture_or_task_name} lengths "
                        f"{dict(cfg.task_feature_lengths)}, the paper's are {want}")
  batch = datasets[0].batch_size
  job.checks.append(f"task {job.task} registered, lengths {datasets[0].task_feature_lengths}, "
                    f"batch {batch}")
  return batch


def parse_job(job: jobs_lib.Job) -> Dict[str, Any]:
  """The keyword arguments the job's gin files and bindings give its entry point, parsed as
  `python -m gqa_t5.train|eval` parses them (a bad file or binding: DryRunError naming the job)."""
  bindings = [f"{k}={jobs_lib.gin_literal(v)}" for k, v in job.bindings.items()]
  try:
    gin_utils.parse(job.gin_files, bindings)
  except gin_utils.GinConfigError as error:
    raise DryRunError(f"{job.name}: {error}") from None
  return gin.get_bindings(entry_point(job))


def check_job(job: jobs_lib.Job, abstract: AbstractParams) -> jobs_lib.Job:
  """Every check of one job; appends what it verified to `job.checks`."""
  kwargs = parse_job(job)
  job.checks.append(f"gin: {' + '.join(job.gin_files)} parse, every REQUIRED macro set")
  model = kwargs["model"]
  config = model.module.config
  _check_model(job, config)
  batch = _check_datasets(job, kwargs)
  sl = job.model.slice
  partitioning.validate(config, (sl.data_parallel, sl.model_parallel), batch,
                        kwargs.get("num_microbatches"))
  shapes = abstract.get(model, config)
  converts = job.kind == "uptrain" or (job.kind == "finetune" and job.model.attention == "mha")
  job.checks.append(check_conversion(job.model, config, shapes["params"]) if converts
                    else "parameters: same tree as the uptrained checkpoint")
  text, totals = check_shardings(job, kwargs, shapes, config)
  job.checks.append(text)
  job.bytes_per_chip = totals
  if kwargs.get("initial_checkpoint_path") not in (None, job.bindings.get(
      "INITIAL_CHECKPOINT_PATH")):
    raise DryRunError(f"{job.name}: INITIAL_CHECKPOINT_PATH did not reach the trainer")
  return job


def configured_model(job: jobs_lib.Job):
  """The model the last parsed gin configuration binds for the job's entry point."""
  return gin.get_bindings(entry_point(job))["model"]
