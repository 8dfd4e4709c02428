"""Orbax checkpoints: t5x's layout and our trainer's, round trips, streamed writes, bad input."""

import os

import jax
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

from gqa_t5.checkpoints import orbax_format, synthetic
from gqa_t5.checkpoints import tree as tree_lib
from gqa_t5.checkpoints.errors import CheckpointError
from gqa_t5.checkpoints.lazy import LazyTensor

from checkpoint_fixtures import assert_trees_equal
from tiny_configs import tiny_config


def test_round_trip_in_t5x_layout(tmp_path):
  params = synthetic.random_params(tiny_config("checkpoint", num_kv_heads=2))
  path = str(tmp_path / "checkpoint_5")
  orbax_format.save_orbax(path, params, step=5)
  # t5x's layout: the step directory holds a 'state' item with {'target', 'state': {'step'}}.
  assert os.path.isfile(os.path.join(path, "state", "_METADATA"))
  source = orbax_format.open_orbax(path)
  assert source.step == 5 and source.config.self_attention_kv_heads == 2
  assert_trees_equal(params, source.read_all())
  # The item directory itself opens too.
  assert orbax_format.open_orbax(os.path.join(path, "state")).step == 5
  loaded, step, extra = orbax_format.load_orbax(path, validate=True)
  assert step == 5 and extra is None
  assert_trees_equal(params, loaded)


class _NumpyHandlerThatAlwaysCopies(ocp.type_handlers.NumpyHandler):
  """Orbax 0.12.0-0.12.4's NumpyHandler: no `deepcopy_host_arrays` keyword (it always copies)."""

  def __init__(self, metadata_key=None, ocdbt_process_id=None):
    super().__init__(metadata_key=metadata_key, ocdbt_process_id=ocdbt_process_id)


def test_round_trip_with_an_orbax_whose_numpy_handler_has_no_copy_keyword(tmp_path, monkeypatch):
  # The GPU box's Orbax is such a one: the keyword, passed unconditionally, failed every save.
  monkeypatch.setattr(ocp.type_handlers, "NumpyHandler", _NumpyHandlerThatAlwaysCopies)
  params = synthetic.random_params(tiny_config("checkpoint", num_kv_heads=2))
  lazy = {name: LazyTensor(name, value.shape, value.dtype, lambda value=value: value)
          for name, value in tree_lib.flatten(params).items()}
  for i, tree in enumerate([params, tree_lib.unflatten(lazy)]):
    path = str(tmp_path / f"checkpoint_{i}")
    orbax_format.save_orbax(path, tree, step=i)
    loaded, step, _ = orbax_format.load_orbax(path)
    assert step == i
    assert_trees_equal(params, loaded)


def test_extra_state_round_trips_with_its_structure(tmp_path):
  params = synthetic.random_params(tiny_config("checkpoint"))
  optimizer = optax.adam(1e-3)
  opt_state = optimizer.init(params)
  opt_state = jax.tree_util.tree_map(lambda x: x + 1, opt_state)
  path = str(tmp_path / "ckpt")
  orbax_format.save_orbax(path, params, step=11, extra={"opt_state": opt_state})
  loaded, step, extra = orbax_format.load_orbax(path, extra_target={"opt_state": opt_state})
  assert step == 11
  assert (jax.tree_util.tree_structure(extra["opt_state"]) ==
          jax.tree_util.tree_structure(opt_state))
  for got, want in zip(jax.tree_util.tree_leaves(extra), jax.tree_util.tree_leaves(opt_state)):
    assert np.array_equal(np.asarray(got), np.asarray(want))
  assert_trees_equal(params, loaded)
  # Without a target, extra comes back as plain containers.
  _, _, plain = orbax_format.load_orbax(path)
  assert isinstance(plain, dict) and "opt_state" in plain


def test_lazy_tensors_are_written_one_at_a_time(tmp_path):
  config = tiny_config("checkpoint")
  lazy = synthetic.lazy_params(config)
  live, peak = [0], [0]

  def tracked(tensor):
    def read():
      live[0] += 1
      peak[0] = max(peak[0], live[0])
      return tensor.read()

    return LazyTensor(tensor.name, tensor.shape, tensor.dtype, read)

  # The handler reads a tensor, writes it, then releases it before reading the next.
  tensors = {name: tracked(t) for name, t in lazy.items()}
  registry = orbax_format._serial_handler_registry()
  handler = registry.get(LazyTensor)
  orig_open_and_write = type(handler)._open_and_write

  async def counting(self, value, tspec, ts_context):
    await orig_open_and_write(self, value, tspec, ts_context)
    if isinstance(value, LazyTensor):
      live[0] -= 1

  type(handler)._open_and_write = counting
  try:
    import orbax.checkpoint as ocp
    item = {"target": tree_lib.unflatten(tensors), "state": {"step": np.asarray(3, np.int32)}}
    with ocp.Checkpointer(ocp.PyTreeCheckpointHandler(type_handler_registry=registry)) as ck:
      ck.save(str(tmp_path / "lazy" / "state"), args=ocp.args.PyTreeSave(item))
  finally:
    type(handler)._open_and_write = orig_open_and_write
  assert peak[0] == 1 and live[0] == 0, (peak, live)
  source = orbax_format.open_orbax(str(tmp_path / "lazy"))
  assert_trees_equal({k: v.read() for k, v in lazy.items()},
                      {k: v.read() for k, v in source.tensors.items()})


def test_reads_our_trainers_layout(tmp_path):
  import orbax.checkpoint as ocp
  params = synthetic.random_params(tiny_config("checkpoint"))
  state = {"step": np.asarray(42, np.int32), "params": params,
           "opt_state": {"count": np.asarray(42, np.int32)}}
  with ocp.Checkpointer(ocp.StandardCheckpointHandler()) as ck:
    ck.save(str(tmp_path / "42" / "state"), args=ocp.args.StandardSave(state))
  source = orbax_format.open_orbax(str(tmp_path / "42"))
  assert source.step == 42
  assert_trees_equal(params, source.read_all())


def test_bad_orbax_input(tmp_path):
  with pytest.raises(CheckpointError, match="not an Orbax checkpoint"):
    orbax_format.open_orbax(str(tmp_path))
  params = tree_lib.flatten(synthetic.random_params(tiny_config("checkpoint")))
  params["decoder/layers_1/mlp/wo/kernel"] = np.zeros((24, 15), np.float32)
  path = str(tmp_path / "bad")
  orbax_format.save_orbax(path, tree_lib.unflatten(params))
  with pytest.raises(CheckpointError, match=r"'decoder/layers_1/mlp/wo/kernel' has shape "
                     r"\(24, 15\), expected \(24, 16\)"):
    orbax_format.open_orbax(path)
  with pytest.raises(CheckpointError, match="already exists"):
    orbax_format.save_orbax(path, tree_lib.unflatten(params))
  assert sorted(os.listdir(tmp_path)) == ["bad"]
