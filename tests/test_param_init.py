"""param_init: the parameters one jitted `init` gives, bit for bit, from draws that do not multiply
with the model's depth."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from gqa_t5 import param_init, partitioning
from gqa_t5.model import Transformer
from gqa_t5.models import EncoderDecoderModel

from tiny_configs import tiny_config

CONFIGS = {
    "MHA": dict(),
    "GQA-2, cross MQA": dict(num_kv_heads=2, num_cross_kv_heads=1),
    "bfloat16, tied logits": dict(num_kv_heads=1, dtype=jnp.bfloat16, logits_via_embedding=True),
    "scanned stacks": dict(num_kv_heads=2, scan_layers=True),
}


def _model(**fields):
  num_kv_heads = fields.pop("num_kv_heads", None)
  return EncoderDecoderModel(Transformer(tiny_config("network", num_kv_heads, **fields)))


def _one_jitted_init(model, rng):
  return jax.jit(lambda r: model.get_initial_variables(r, param_init.INIT_SHAPES)["params"])(rng)


def _assert_identical(actual, expected):
  flat_actual = traverse_util.flatten_dict(actual)
  flat_expected = traverse_util.flatten_dict(expected)
  assert sorted(flat_actual) == sorted(flat_expected)
  for path, value in flat_expected.items():
    assert flat_actual[path].dtype == value.dtype, path
    np.testing.assert_array_equal(np.asarray(flat_actual[path]), np.asarray(value),
                                  err_msg="/".join(path))


@pytest.mark.parametrize("name", list(CONFIGS))
def test_parameters_are_one_jitted_inits_bit_for_bit(name):
  model = _model(**CONFIGS[name])
  rng = jax.random.PRNGKey(7)
  _assert_identical(param_init.init_params(model, rng), _one_jitted_init(model, rng))


def test_placed_with_the_partitioners_shardings_and_cast_as_drawn():
  model = _model(num_kv_heads=2)
  partitioner = partitioning.Partitioner(data_parallel=1, model_parallel=1)
  partitioner.setup_for(model.module.config)
  _, axes = partitioning.abstract_params_and_axes(model)
  shardings = partitioner.shardings(axes)
  rng = jax.random.PRNGKey(3)
  with partitioner.mesh, partitioner.axis_rules():
    params = param_init.init_params(model, rng, shardings, dtype=jnp.bfloat16)
  expected = jax.tree.map(lambda x: x.astype(jnp.bfloat16), _one_jitted_init(model, rng))
  _assert_identical(params, expected)
  placed = jax.tree.map(lambda x, s: x.sharding == s, params, shardings)
  assert all(jax.tree.leaves(placed))


def test_alike_parameters_share_one_draw_whatever_the_depth():
  """Each layer adds parameters, not programs: XLA compiles one draw per group."""
  def counts(layers):
    model = _model(num_kv_heads=2, num_encoder_layers=layers, num_decoder_layers=layers)
    parameters, keys = param_init._parameters_and_keys(model, jax.random.PRNGKey(0))
    return len(parameters), len(param_init._groups(parameters, keys, {}))
  (shallow_parameters, shallow_groups), (deep_parameters, deep_groups) = counts(1), counts(4)
  assert deep_parameters > shallow_parameters
  assert deep_groups == shallow_groups < shallow_parameters
