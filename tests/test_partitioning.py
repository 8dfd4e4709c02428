"""Mesh, logical axis rules (with key/value heads), start-up checks, sharded = unsharded step."""

import json
import os
import subprocess

import pytest

import trainer_fixtures as fx
from gqa_t5 import partitioning
from tiny_configs import tiny_config


def test_standard_rules_follow_t5x_and_shard_kv_heads_only_when_divisible():
  rules = dict(partitioning.standard_logical_axis_rules(8, 8, model_axis_size=4))
  assert rules["batch"] == "data"
  for name in ("vocab", "mlp", "heads", "joined_kv"):
    assert rules[name] == "model"
  for name in ("embed", "kv", "length", "relpos_buckets", "layers"):
    assert rules[name] is None
  assert rules["grouped_kv"] == "model" and rules["kv_heads"] == "model"
  # K = 2 on a model axis of 4: replicated; the query heads stay sharded.
  rules = dict(partitioning.standard_logical_axis_rules(2, 2, model_axis_size=4))
  assert rules["grouped_kv"] is None and rules["kv_heads"] is None
  assert rules["joined_kv"] == "model"
  # Cross-attention K that does not divide replicates both (one logical name serves both).
  rules = dict(partitioning.standard_logical_axis_rules(4, 1, model_axis_size=4))
  assert rules["grouped_kv"] is None


def test_partitioner_maps_logical_axes_to_specs():
  p = partitioning.Partitioner(data_parallel=1, model_parallel=1).setup_for(tiny_config(
      "partitioning", num_kv_heads=2))
  assert tuple(p.logical_to_spec(("embed", "joined_kv"))) == (None, "model")
  assert tuple(p.logical_to_spec(("batch", "length"))) == ("data", None)
  assert p.mesh_shape == (1, 1)


def test_partitioner_refuses_rules_that_miss_a_logical_axis():
  """t5x's standard table lacks our key/value axes: refused, naming the axis and a path."""
  attention = {"key": {"kernel": ("embed", "grouped_kv")},
               "query": {"kernel": ("embed", "joined_kv")}}
  axes = {"decoder": {"layers_0": {"self_attention": attention}}}
  p = partitioning.Partitioner(data_parallel=1, model_parallel=1,
                               rules=list(partitioning.T5X_STANDARD_RULES))
  with pytest.raises(partitioning.LogicalAxisError,
                     match=r"partitioner's logical axis rules do not cover logical axis/axes "
                           r"\['grouped_kv'\].*decoder/layers_0/self_attention/key/kernel"):
    p.shardings(axes)
  ok = partitioning.Partitioner(data_parallel=1, model_parallel=1).setup_for(tiny_config(
      "partitioning", num_kv_heads=2))
  spec = ok.shardings(axes)["decoder"]["layers_0"]["self_attention"]["key"]["kernel"].spec
  assert tuple(spec) == (None, "model")  # K = 2 divides a model axis of 1


def test_mesh_shape_errors_say_what_would_work():
  with pytest.raises(partitioning.PartitioningError, match=r"model axis size 3 does not "
                                                            r"divide the 8 available devices; "
                                                            r"model axis sizes that would "
                                                            r"work: \[1, 2, 4, 8\]"):
    partitioning.resolve_mesh_shape(-1, 3, 8)
  with pytest.raises(partitioning.PartitioningError, match=r"needs 8 devices but 4 are "
                                                            r"available; with model=2 use "
                                                            r"data=2"):
    partitioning.resolve_mesh_shape(4, 2, 4)
  assert partitioning.resolve_mesh_shape(-1, 2, 8) == (4, 2)


def test_validation_names_the_field_and_the_sizes_that_work():
  with pytest.raises(partitioning.PartitioningError,
                     match=r"num_heads=6 is not a multiple of the model axis size 4.*"
                           r"Model axis sizes that would work on 8 devices: \[1, 2\]"):
    partitioning.validate(tiny_config("partitioning", num_heads=6), (2, 4))
  with pytest.raises(partitioning.PartitioningError, match=r"mlp_dim=60"):
    partitioning.validate(tiny_config("partitioning", mlp_dim=60), (1, 8))
  with pytest.raises(partitioning.PartitioningError,
                     match=r"micro-batch of 6 examples .* data axis of size 4; use a batch "
                           r"size that is a multiple of 8"):
    partitioning.validate(tiny_config("partitioning"), (4, 2), batch_size=12, num_microbatches=2)
  with pytest.raises(partitioning.PartitioningError, match=r"not a multiple of "
                                                            r"num_microbatches=5"):
    partitioning.validate(tiny_config("partitioning"), (1, 1), batch_size=8, num_microbatches=5)


def test_kv_layout_message_explains_replication():
  text = partitioning.validate(tiny_config("partitioning", num_kv_heads=2), (2, 4), batch_size=8)
  assert "K=2" in text and "replicated" in text and "[1, 2]" in text
  text = partitioning.validate(tiny_config("partitioning", num_kv_heads=8), (1, 8), batch_size=8)
  assert "sharded over model axis 8" in text


def test_distributed_start_needs_process_count_and_id(monkeypatch):
  for name in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
    monkeypatch.delenv(name, raising=False)
  assert partitioning.maybe_initialize_distributed() is False
  with pytest.raises(partitioning.PartitioningError, match="without the number of processes"):
    partitioning.maybe_initialize_distributed("localhost:1234")
  with pytest.raises(partitioning.PartitioningError, match=r"process_id=3 must be in \[0, 2\)"):
    partitioning.maybe_initialize_distributed("localhost:1234", 2, 3)


def test_sharded_step_equals_single_device_step_on_8_simulated_devices():
  """Meshes (8,1), (2,4), (4,2), (1,8) with K in {2, 1}: same parameters as one device."""
  pytest.importorskip("seqio")  # the child trains on a toy seqio task
  env = fx.subprocess_env(num_devices=8)
  result = subprocess.run([fx.PYTHON, os.path.join(fx.REPO, "tests", "sharded_step_child.py")],
                          env=env, capture_output=True, text=True, timeout=900)
  assert result.returncode == 0, result.stderr[-3000:]
  rows = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
  cases = {(tuple(r["mesh"]), r["k"]) for r in rows}
  # K = 2 and K = 1 on model axes of 4 and 8 (replicated key/value heads), K = 2 on a model
  # axis of 2 (sharded), and pure data parallelism.
  assert cases == {((8, 1), 2), ((2, 4), 2), ((4, 2), 2), ((1, 8), 1)}
  for r in rows:
    assert r["max_param_diff"] <= 1e-6 * max(1.0, r["param_scale"]), r
    assert abs(r["loss"] - r["ref_loss"]) <= 1e-4 * abs(r["ref_loss"]), r
    model_axis = r["mesh"][1]
    assert r["query_spec"] == ("P(None, 'model')")
    if model_axis > 1 and r["k"] % model_axis:
      assert r["key_spec"] == "P(None, None)", r   # replicated key/value heads
    else:
      assert r["key_spec"] == "P(None, 'model')", r
