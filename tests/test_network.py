"""The network: T5X's parameter tree, cached decoding equal to teacher forcing, cross-KV reuse."""

import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fixture_paths
from flax import traverse_util

from gqa_t5.model import T5Config, Transformer
from gqa_t5.model import products
from gqa_t5.model.layers import Embed, RelativePositionBiases, relative_position_bucket
from model_fixtures import KV_HEADS, forward, init_params, tiny_batch
from tiny_configs import tiny_config

# bfloat16 activations vs float32, max abs logits difference (the logits are O(3) here).
BF16_LOGITS_ATOL = 0.25
GOLDEN_DIR = os.path.join(os.path.dirname(__file__), "goldens")
FIXTURE = fixture_paths.T5X_TINY


def param_table(config: T5Config) -> str:
  """'path shape axes' per parameter, from abstract initialisation (no compute)."""
  batch = tiny_batch(batch=1, input_length=4, target_length=3, vocab=config.vocab_size)
  module = Transformer(config)
  variables = jax.eval_shape(
      lambda: module.init(jax.random.PRNGKey(0), batch["encoder_input_tokens"],
                          batch["decoder_input_tokens"], batch["decoder_target_tokens"],
                          enable_dropout=False))
  params = traverse_util.flatten_dict(variables["params"], sep="/")
  axes = traverse_util.flatten_dict(variables["params_axes"], sep="/")
  lines = []
  for path in sorted(params):
    parent, name = path.rsplit("/", 1)
    names = axes[f"{parent}/{name}_axes"].names
    lines.append(f"{path} {tuple(params[path].shape)} {tuple(names)}")
  return "\n".join(lines) + "\n"


@pytest.mark.parametrize("name,kv_heads,cross_kv_heads", [
    ("mha", None, None), ("gqa2_cross1", 2, 1)])
def test_parameter_tree_matches_golden(name, kv_heads, cross_kv_heads):
  config = tiny_config("network", kv_heads, num_cross_kv_heads=cross_kv_heads)
  golden_path = os.path.join(GOLDEN_DIR, f"param_tree_{name}.txt")
  table = param_table(config)
  if os.environ.get("GQA_T5_UPDATE_GOLDENS"):
    with open(golden_path, "w") as f:
      f.write(table)
  with open(golden_path) as f:
    assert table == f.read()


def test_mha_tree_equals_the_tree_t5x_wrote():
  """Paths, shapes and logical axes as t5x's own model-info.txt of the fixture checkpoint."""
  config = tiny_config("t5x_fixture")
  ours = {}
  for line in param_table(config).splitlines():
    path, rest = line.split(" ", 1)
    shape, axes = rest.split(") (")
    ours[path] = (eval(shape + ")"), eval("(" + axes))
  t5x = {}
  pattern = re.compile(r"^Variable (\S+)\s+size \d+\s+shape \(([^)]*)\)")
  with open(os.path.join(FIXTURE, "model-info.txt")) as f:
    for line in f:
      match = pattern.match(line)
      if not match or match.group(1).startswith("param_states") or match.group(1) == "step":
        continue
      dims = [d.strip() for d in match.group(2).split(",") if d.strip()]
      t5x[match.group(1)] = (tuple(int(d.split("=")[1]) for d in dims),
                             tuple(d.split("=")[0] for d in dims))
  assert sorted(ours) == sorted(t5x)
  for path, (shape, axes) in t5x.items():
    assert ours[path][0] == shape, path
    # MHA key/value kernels are named 'grouped_kv' in the decoder so they can be replicated when
    # K does not divide the model axis; everything else carries T5X's names.
    assert tuple("joined_kv" if a == "grouped_kv" else a for a in ours[path][1]) == axes, path


def decode_step_by_step(module, params, batch, encoded_override=None):
  enc = batch["encoder_input_tokens"]
  dec_in = batch["decoder_input_tokens"]
  _, cache = module.apply({"params": params}, enc, jnp.ones_like(dec_in), jnp.ones_like(dec_in),
                          decode=True, enable_dropout=False, mutable=["cache"])
  cache = cache["cache"]
  encoded = module.apply({"params": params}, enc, enable_dropout=False, method=module.encode)
  @jax.jit
  def step(cache, encoded, tokens):
    return module.apply({"params": params, "cache": cache}, encoded, enc, tokens,
                        jnp.ones_like(tokens), decode=True, enable_dropout=False,
                        mutable=["cache"], method=module.decode)
  steps = []
  for t in range(dec_in.shape[1]):
    step_encoded = encoded if (t == 0 or encoded_override is None) else encoded_override
    logits, updated = step(cache, step_encoded, dec_in[:, t:t + 1])
    cache = updated["cache"]
    steps.append(logits)
  return jnp.concatenate(steps, axis=1), cache


def assert_equal_on_real_targets(stepped, teacher_forced, batch):
  # Teacher forcing masks padded target positions out entirely; decoding never sees padding.
  real = np.asarray(batch["decoder_target_tokens"]) > 0
  assert real.sum() < real.size  # the batch does contain padding
  np.testing.assert_allclose(np.asarray(stepped)[real], np.asarray(teacher_forced)[real],
                             atol=2e-5)


@pytest.mark.parametrize("num_kv_heads", KV_HEADS)
def test_cached_decoding_equals_teacher_forcing(num_kv_heads):
  batch = tiny_batch()
  module, params = init_params(tiny_config("network", num_kv_heads), batch)
  teacher_forced = forward(module, params, batch)
  stepped, cache = decode_step_by_step(module, params, batch)
  assert_equal_on_real_targets(stepped, teacher_forced, batch)
  layer = cache["decoder"]["layers_0"]
  assert layer["self_attention"]["cached_key"].shape == (3, num_kv_heads, 6, 8)  # [B, K, S, H]
  assert layer["encoder_decoder_attention"]["cached_key"].shape == (3, num_kv_heads, 9, 8)


def test_cross_kv_heads_can_differ_from_self_kv_heads():
  batch = tiny_batch()
  module, params = init_params(tiny_config("network", 2, num_cross_kv_heads=1), batch)
  teacher_forced = forward(module, params, batch)
  stepped, cache = decode_step_by_step(module, params, batch)
  assert_equal_on_real_targets(stepped, teacher_forced, batch)
  layer = cache["decoder"]["layers_1"]
  assert layer["self_attention"]["cached_value"].shape[1] == 2
  assert layer["encoder_decoder_attention"]["cached_value"].shape[1] == 1


def test_encoder_keys_values_are_projected_once_per_sequence():
  """After the first step the cross-attention reads its cache, not the `encoded` it is handed."""
  batch = tiny_batch()
  module, params = init_params(tiny_config("network", 2), batch)
  reference, _ = decode_step_by_step(module, params, batch)
  garbage = jnp.full((3, 9, 24), 123.0)
  reused, _ = decode_step_by_step(module, params, batch, encoded_override=garbage)
  np.testing.assert_allclose(np.asarray(reused), np.asarray(reference), atol=1e-6)


def test_dropout_is_active_only_when_enabled():
  batch = tiny_batch()
  module, params = init_params(tiny_config("network", 2, dropout_rate=0.3), batch)
  plain = forward(module, params, batch)
  again = forward(module, params, batch)
  dropped = jax.jit(lambda p, b, r: module.apply({"params": p}, **b, enable_dropout=True,
                                                 rngs={"dropout": r}))(
                                                     params, batch, jax.random.PRNGKey(1))
  np.testing.assert_array_equal(np.asarray(plain), np.asarray(again))
  assert float(jnp.max(jnp.abs(dropped - plain))) > 1e-3


def test_bfloat16_activations_keep_float32_params_and_logits():
  batch = tiny_batch()
  module, params = init_params(tiny_config("network", 1, dtype=jnp.bfloat16), batch)
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(params))
  logits = forward(module, params, batch)
  assert logits.dtype == jnp.float32
  logits32 = forward(Transformer(tiny_config("network", 1)), params, batch)
  assert float(jnp.max(jnp.abs(logits - logits32))) < BF16_LOGITS_ATOL


@pytest.mark.parametrize("num_kv_heads", [4, 2])
def test_bfloat16_logits_tolerance_catches_a_wrong_head_pairing(num_kv_heads):
  """bfloat16 logits differ from float32 by ~0.05 here; pairing every query head with the next
  group's key/value head (rolled key/value kernels) moves them by more than 3."""
  batch = tiny_batch()
  config = tiny_config("network", num_kv_heads)
  module, params = init_params(config.replace(dtype=jnp.bfloat16), batch)
  logits32 = forward(Transformer(config), params, batch)
  assert float(jnp.max(jnp.abs(forward(module, params, batch) - logits32))) < BF16_LOGITS_ATOL
  rolled = jax.tree.map(lambda x: x, params)
  for i in range(config.num_decoder_layers):
    for attention in ("self_attention", "encoder_decoder_attention"):
      for name in ("key", "value"):
        leaf = rolled["decoder"][f"layers_{i}"][attention][name]
        heads = leaf["kernel"].reshape(config.emb_dim, num_kv_heads, config.head_dim)
        leaf["kernel"] = jnp.roll(heads, 1, axis=1).reshape(leaf["kernel"].shape)
  wrong = forward(Transformer(config), rolled, batch)
  assert float(jnp.max(jnp.abs(wrong - logits32))) > 4 * BF16_LOGITS_ATOL


def test_padding_in_inputs_does_not_change_logits():
  batch = tiny_batch()
  module, params = init_params(tiny_config("network", 2), batch)
  logits = forward(module, params, batch)
  longer = dict(batch)
  longer["encoder_input_tokens"] = jnp.pad(batch["encoder_input_tokens"], ((0, 0), (0, 4)))
  assert_equal_on_real_targets(forward(module, params, longer), logits, batch)


@pytest.mark.parametrize("remat_policy", ["none", "full"])
def test_scanned_layers_equal_unrolled_layers(remat_policy):
  from gqa_t5.model.scanning import stack_layers, unstack_layers
  batch = tiny_batch()
  config = tiny_config("network", 2)
  module, params = init_params(config, batch)
  scanned_config = config.replace(scan_layers=True, remat_policy=remat_policy)
  scanned_params = stack_layers(params)
  kernel = scanned_params["decoder"]["layers"]["self_attention"]["key"]["kernel"]
  assert kernel.shape == (24, 2, 16)  # [emb, layers, K*H]: T5X's param_scan_axis = 1
  scanned = Transformer(scanned_config)
  np.testing.assert_allclose(np.asarray(forward(scanned, scanned_params, batch)),
                             np.asarray(forward(module, params, batch)), atol=1e-5)
  def loss(module, p):
    return jnp.sum(module.apply({"params": p}, **batch, enable_dropout=False) ** 2)
  grads = jax.jit(jax.grad(lambda p: loss(scanned, p)))(scanned_params)
  reference = stack_layers(jax.jit(jax.grad(lambda p: loss(module, p)))(params))
  for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(reference)):
    # A gradient element is a float32 sum of terms as large as the leaf's largest: the two
    # layouts sum them in different orders (on an H200: 1.5e-5 apart at an element of 0.037).
    scale = max(1.0, float(np.abs(np.asarray(b)).max()))
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5 * scale)
  round_trip = unstack_layers(scanned_params)
  assert jax.tree.structure(round_trip) == jax.tree.structure(params)
  for a, b in zip(jax.tree.leaves(round_trip), jax.tree.leaves(params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_cache_is_batch_leading_except_cache_index_as_t5x_expects():
  """t5x's cache_map expands every cache leaf along axis 0 for beams, except `cache_index`."""
  batch = tiny_batch()
  module, params = init_params(tiny_config("network", 2), batch)
  _, cache = module.apply({"params": params}, batch["encoder_input_tokens"],
                          jnp.ones_like(batch["decoder_input_tokens"]),
                          jnp.ones_like(batch["decoder_input_tokens"]), decode=True,
                          enable_dropout=False, mutable=["cache"])
  leaves = traverse_util.flatten_dict(cache["cache"])
  assert any(path[-1] == "kv_filled" for path in leaves)
  for path, leaf in leaves.items():
    if path[-1] == "cache_index":
      assert leaf.shape == ()
    else:
      assert leaf.shape[0] == 3, path


def test_t5x_is_optional_and_its_absence_is_explained():
  import importlib.util
  from gqa_t5 import t5x_compat
  if importlib.util.find_spec("t5x") is not None:
    assert t5x_compat.require_t5x() is not None
  else:
    with pytest.raises(ImportError, match="not on PyPI"):
      t5x_compat.require_t5x()


def _scatters_into(hlo: str, shape: str) -> int:
  """How many scatters of a lowered program produce a tensor<shape...> (e.g. '8x32xf32')."""
  results = re.findall(r'stablehlo\.scatter".*?\}\) : \([^\n]*?\) -> tensor<([0-9a-z]+)>', hlo,
                       flags=re.DOTALL)
  return sum(result.startswith(shape) for result in results)


@pytest.mark.parametrize("platform, scatters", [("cpu", 2), ("cuda", 0), ("tpu", 0)])
def test_relative_bias_gradient_is_a_scatter_on_cpu_only(platform, scatters):
  # A GPU's scatter-add of every (query, key) pair's gradient into the [N, buckets] table is a
  # contended atomic loop, and a TPU serialises it: there the gradient is a one-hot matrix
  # product (products.bias_lookup). Both stacks (encoder and decoder) have their own table.
  batch = tiny_batch()
  config = tiny_config("network", 2)
  module, params = init_params(config, batch)

  def loss(p):
    return jnp.sum(module.apply({"params": p}, **batch, enable_dropout=False) ** 2)

  hlo = jax.jit(jax.grad(loss)).trace(params).lower(lowering_platforms=(platform,)).as_text()
  table = params["encoder"]["relpos_bias"]["rel_embedding"].shape
  assert _scatters_into(hlo, f"{table[0]}x{table[1]}x") == scatters


@pytest.mark.parametrize("dtype, rtol", [(jnp.float32, 1e-6), (jnp.bfloat16, 1e-2)])
@pytest.mark.parametrize("positions", ["shared", "per_example"])
def test_relative_bias_table_gradients_agree(dtype, rtol, positions):
  rng = np.random.default_rng(0)
  table = jnp.asarray(rng.normal(size=(4, 32)), dtype)
  buckets = jnp.asarray(rng.integers(0, 32, (1 if positions == "shared" else 3, 9, 11)), jnp.int32)
  grad = jnp.asarray(rng.normal(size=(4,) + buckets.shape), dtype)          # [N, 1|B, T, S]
  # The forward is the lookup itself, and on this CPU the gradient is the lookup's own transpose.
  np.testing.assert_array_equal(products.bias_lookup(table, buckets),
                                jnp.take(table, buckets, axis=1))
  reference = jax.vjp(lambda t: jnp.take(t, buckets, axis=1), table)[1](grad)[0]
  ours = jax.vjp(lambda t: products.bias_lookup(t, buckets), table)[1](grad)[0]
  np.testing.assert_array_equal(ours, reference)
  # The other platforms' formulation sums the same terms (in float32, then cast).
  exact = np.einsum("nbts,btsk->nk", np.asarray(grad, np.float64),
                    np.eye(32)[np.asarray(buckets)])
  one_hot = products._one_hot_table_grad(grad, buckets, table)  # pylint: disable=protected-access
  assert one_hot.dtype == table.dtype
  scale = np.abs(exact).max()
  np.testing.assert_allclose(np.asarray(one_hot, np.float64), exact, rtol=rtol, atol=rtol * scale)


def test_token_embedding_gradient_accumulates_in_float32():
  # bfloat16 activations, one token repeated 4,096 times (a padded batch's padding id): its
  # gradient row is the sum of 4,096 rows, accumulated in float32 (in bfloat16 it came out 87%
  # low: a bfloat16 sum stops growing).
  embed = Embed(num_embeddings=8, features=16, dtype=jnp.bfloat16)
  variables = embed.init(jax.random.PRNGKey(0), jnp.zeros((1,), jnp.int32))
  tokens = jnp.zeros((64, 64), jnp.int32).at[:, :3].set(5)
  upstream = jnp.asarray(np.random.default_rng(0).uniform(0.5, 1.5, (64, 64, 16)), jnp.bfloat16)

  def loss(params):
    return jnp.sum(embed.apply({"params": params}, tokens).astype(jnp.float32) * upstream)

  grad = jax.grad(loss)(variables["params"])["embedding"]
  exact = np.asarray(upstream, np.float64)[np.asarray(tokens) == 0].sum(axis=0)
  np.testing.assert_allclose(np.asarray(grad[0], np.float64), exact, rtol=1e-5)
  np.testing.assert_array_equal(embed.apply(variables, tokens),
                                variables["params"]["embedding"].astype(jnp.bfloat16)[tokens])


def test_relative_bias_gradient_accumulates_in_float32():
  # bfloat16 activations, 128 x 128 (query, key) pairs: the far buckets each sum thousands of
  # pairs' gradients, in float32 on every platform (the table is looked up before the cast).
  relpos = RelativePositionBiases(num_buckets=32, max_distance=128, num_heads=2,
                                  dtype=jnp.bfloat16)
  positions = jnp.arange(128)
  variables = relpos.init(jax.random.PRNGKey(0), positions, positions, bidirectional=True)
  upstream = jnp.asarray(np.random.default_rng(0).uniform(0.5, 1.5, (1, 2, 128, 128)),
                         jnp.bfloat16)

  def loss(params):
    bias = relpos.apply({"params": params}, positions, positions, bidirectional=True)
    assert bias.dtype == jnp.bfloat16
    return jnp.sum(bias.astype(jnp.float32) * upstream)

  grad = jax.grad(loss)(variables["params"])["rel_embedding"]                 # [N, buckets]
  buckets = np.asarray(relative_position_bucket(positions[None, :] - positions[:, None], True,
                                                32, 128))                    # [T, S]
  exact = np.stack([np.bincount(buckets.ravel(), np.asarray(upstream[0, n], np.float64).ravel(),
                                minlength=32) for n in range(2)])
  assert exact.max() > 1000
  np.testing.assert_allclose(np.asarray(grad, np.float64), exact, rtol=1e-5)
