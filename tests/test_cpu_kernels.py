"""The CPU decode kernels (gqa_t5/model/cpu_kernels.cc) against the einsums they replace.

Reference-vs-fast: every product the kernels compute is compared with the einsum (or jnp.dot) it
stands in for, on shapes that reach every code path (one row, odd rows, key lengths and widths
that leave tails, leading batch dims, vmap), gradients included; and each test first checks that
the compiled CPU program really calls the kernel, so none of them can pass on the fallback. The
builds for narrower instruction sets than this CPU's (AVX2, scalar) are compiled and compared too. The
same programs lowered for TPU or GPU contain no custom call. A decode with the kernels gives the
einsum path's logits and tokens. A missing compiler falls back with one warning, or is an error
when the kernels are required.
"""

import concurrent.futures
import ctypes
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gqa_t5.model import Transformer, attention, cpu_kernels, products
from gqa_t5.models import EncoderDecoderModel
from tests import tiny_configs

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(
    cpu_kernels.mode() == "off" or not cpu_kernels.available(),
    reason="CPU kernels off or not buildable here (no C++ compiler): the einsums run instead")


def _calls_kernel(fn, *args) -> bool:
  text = jax.jit(fn).trace(*args).lower(lowering_platforms=("cpu",)).as_text()
  return any(target in text for target in cpu_kernels.TARGETS.values())


def _random(rng, *shape):
  return jnp.asarray(rng.standard_normal(shape).astype(np.float32))


# (B, K, R, S, H): MHA's one row, GQA's few, MQA's many, tails of S (not a multiple of 4, past a
# 64-key block) and of R (not a multiple of 8, 4 or 2), H a multiple of 64, of 32 only, of 16
# only and of 8 only (each tile width of the kernels), the largest row count the kernels take;
# one head split into several work items (logits key blocks, context column chunks) whose
# context sums run over several 128-key blocks, and 512-key logits blocks with a short last one.
ATTENTION_SHAPES = [(2, 4, 1, 12, 64), (3, 2, 2, 7, 8), (1, 1, 8, 33, 16), (2, 3, 5, 9, 24),
                    (2, 1, 64, 130, 40), (8, 4, 2, 512, 64), (1, 2, 6, 70, 64), (2, 1, 3, 5, 32),
                    (1, 2, 9, 66, 48), (1, 1, 5, 301, 64), (2, 2, 8, 1030, 64)]


@pytest.mark.parametrize("shape", ATTENTION_SHAPES)
def test_attention_products_match_the_einsums(shape):
  b, k, r, s, h = shape
  rng = np.random.default_rng(sum(shape))
  rows, keys = _random(rng, b, k, r, h), _random(rng, b, k, s, h)
  weights = jax.nn.softmax(_random(rng, b, k, r, s), axis=-1)
  assert _calls_kernel(products.logits, rows, keys)
  assert _calls_kernel(products.context, weights, keys)
  np.testing.assert_allclose(jax.jit(products.logits)(rows, keys),
                             jnp.einsum("bkrh,bksh->bkrs", rows, keys), rtol=1e-5, atol=2e-5)
  np.testing.assert_allclose(jax.jit(products.context)(weights, keys),
                             jnp.einsum("bkrs,bksh->bkrh", weights, keys), rtol=1e-5, atol=2e-6)


@pytest.mark.parametrize("shape", ATTENTION_SHAPES)
def test_softmax_matches_jax(shape):
  """Rows of logits with a masked tail (finfo.min, as the core masks) and a large spread, so the
  exponential's whole range and the tails of 16 lanes are reached."""
  b, k, r, s, _ = shape
  rng = np.random.default_rng(sum(shape))
  logits = np.asarray(_random(rng, b, k, r, s)) * 30.0
  logits[..., s - s // 3:] = np.finfo(np.float32).min
  logits = jnp.asarray(logits)
  assert _calls_kernel(products.softmax, logits)
  got = jax.jit(products.softmax)(logits)
  np.testing.assert_allclose(got, jax.nn.softmax(logits, axis=-1), rtol=2e-6, atol=1e-9)
  assert np.all(np.asarray(got)[..., s - s // 3:] == 0.0)


# (B, K, G, T, S, mask batch): a decode step's one query row per head (MHA) and eight (MQA),
# the full-sequence core's T > 1 (each row's mask row is its position's), a mask shared by the
# batch, and key lengths that leave tails of 16 lanes.
MASKED_SOFTMAX_SHAPES = [(2, 4, 1, 1, 37, 2), (2, 1, 8, 1, 130, 2), (1, 2, 2, 5, 9, 1),
                         (3, 2, 4, 3, 16, 3)]


@pytest.mark.parametrize("shape", MASKED_SOFTMAX_SHAPES)
def test_masked_softmax_is_the_select_then_the_softmax_bit_for_bit(shape):
  """The fused kernel against the unfused path it replaces (XLA's select, then the softmax
  kernel), exactly, and against jax's softmax to rounding; with a row whose keys are all masked
  (uniform weights, as the select then softmax give)."""
  b, k, g, t, s, mask_batch = shape
  rng = np.random.default_rng(sum(shape))
  logits = _random(rng, b, k, g, t, s) * 30.0
  mask = (rng.random((mask_batch, 1, t, s)) < 0.7).astype(np.float32)
  mask[0, 0, t - 1, :] = 0.0
  mask = jnp.asarray(mask)
  text = jax.jit(products.masked_softmax).trace(logits, mask).lower(
      lowering_platforms=("cpu",)).as_text()
  assert cpu_kernels.TARGETS["masked_softmax"] in text
  got = np.asarray(jax.jit(products.masked_softmax)(logits, mask))
  unfused = np.asarray(jax.jit(products._select_then_softmax)(logits, mask))
  np.testing.assert_array_equal(got, unfused)
  allowed = np.asarray(mask)[:, :, None] > 0
  reference = jax.nn.softmax(jnp.where(allowed, logits, np.finfo(np.float32).min), axis=-1)
  np.testing.assert_allclose(got, reference, rtol=2e-6, atol=1e-9)
  allowed = np.broadcast_to(allowed, got.shape)
  some_allowed = np.broadcast_to(allowed.any(axis=-1, keepdims=True), got.shape)
  assert np.all(got[~allowed & some_allowed] == 0.0)
  np.testing.assert_allclose(got[0, :, :, t - 1], 1.0 / s, rtol=1e-6)


def test_a_mask_of_another_shape_takes_the_select_then_the_softmax():
  """A mask the kernel does not take ([B, K, T, S], one per key/value head, which the select
  broadcasts) runs the unfused path, with the same result as jax's select and softmax."""
  b, k, g, t, s = 2, 2, 3, 1, 20
  rng = np.random.default_rng(3)
  logits = _random(rng, b, k, g, t, s) * 10.0
  mask = jnp.asarray((rng.random((b, k, t, s)) < 0.6).astype(np.float32))
  text = jax.jit(products.masked_softmax).trace(logits, mask).lower(
      lowering_platforms=("cpu",)).as_text()
  assert cpu_kernels.TARGETS["masked_softmax"] not in text
  reference = jax.nn.softmax(jnp.where(mask[:, :, None] > 0, logits, np.finfo(np.float32).min),
                             axis=-1)
  np.testing.assert_allclose(jax.jit(products.masked_softmax)(logits, mask), reference,
                             rtol=2e-6, atol=1e-9)


# (x's shape, F): one row, a few, tails of F (not a multiple of 8 or 16, past a column block),
# of D (not a multiple of 4 or 8) and of the rows (not of 2 or 4), the most rows, a decode
# step's [B, 1, D], the logits' width; weights split into row ranges whose partial sums are
# added (D of 128 and more, over 64K entries), with a range not a multiple of eight rows and
# two column blocks.
DENSE_SHAPES = [((1, 8), 16), ((3, 24), 40), ((16, 66), 17), ((2, 1, 24), 40), ((5, 20), 300),
                ((64, 44), 530), ((8, 512), 1000), ((4, 1, 64), 32128), ((3, 203), 403),
                ((64, 136), 1030)]


@pytest.mark.parametrize("x_shape,features", DENSE_SHAPES)
def test_dense_matches_the_dot(x_shape, features):
  rng = np.random.default_rng(features)
  x, kernel = _random(rng, *x_shape), _random(rng, x_shape[-1], features)
  assert _calls_kernel(products.dense, x, kernel)
  np.testing.assert_allclose(jax.jit(products.dense)(x, kernel), jnp.dot(x, kernel),
                             rtol=1e-5, atol=1e-4)


# The narrower instruction sets' builds (this machine's own build is the one tested above): the
# compiler flags that remove AVX-512, and AVX/AVX2/FMA as well (the portable scalar code).
NARROWER_BUILDS = {"avx2": ("-mno-avx512f",),
                   "scalar": ("-mno-avx512f", "-mno-avx2", "-mno-fma", "-mno-avx")}


@pytest.fixture(scope="module")
def narrower_targets(tmp_path_factory):
  """{build: {product: FFI target name}}: each build compiled here and registered under its own
  names, so its tiles run whatever this CPU's own build uses."""
  compiler = cpu_kernels._compiler()
  targets = {}
  for name, flags in NARROWER_BUILDS.items():
    path = tmp_path_factory.mktemp(name) / "cpu_kernels.so"
    cpu_kernels.build(compiler, path, extra_flags=flags)
    library = ctypes.cdll.LoadLibrary(str(path))
    targets[name] = {}
    for product in ("logits", "context", "dense", "softmax", "masked_softmax"):
      symbol = cpu_kernels.TARGETS[product]
      targets[name][product] = f"{symbol}_{name}"
      jax.ffi.register_ffi_target(f"{symbol}_{name}", jax.ffi.pycapsule(getattr(library, symbol)),
                                  platform="cpu")
  return targets


@pytest.mark.parametrize("build", sorted(NARROWER_BUILDS))
def test_narrower_instruction_set_builds_match_the_einsums(narrower_targets, build):
  call = lambda product, out, *args: jax.ffi.ffi_call(
      narrower_targets[build][product], jax.ShapeDtypeStruct(out, jnp.float32))(*args)
  rng = np.random.default_rng(7)
  for b, k, r, s, h in ATTENTION_SHAPES:
    rows, keys = _random(rng, b * k, r, h), _random(rng, b * k, s, h)
    weights = jax.nn.softmax(_random(rng, b * k, r, s), axis=-1)
    np.testing.assert_allclose(call("logits", (b * k, r, s), rows, keys),
                               jnp.einsum("prh,psh->prs", rows, keys), rtol=1e-5, atol=2e-5)
    np.testing.assert_allclose(call("context", (b * k, r, h), weights, keys),
                               jnp.einsum("prs,psh->prh", weights, keys), rtol=1e-5, atol=2e-6)
    logits = _random(rng, b * k, r, s) * 30.0
    np.testing.assert_allclose(call("softmax", (b * k, r, s), logits),
                               jax.nn.softmax(logits, axis=-1), rtol=2e-6, atol=1e-9)
  for b, k, g, t, s, mask_batch in MASKED_SOFTMAX_SHAPES:
    logits = _random(rng, b, k, g, t, s) * 30.0
    mask = jnp.asarray((rng.random((mask_batch, 1, t, s)) < 0.7).astype(np.float32))
    np.testing.assert_allclose(
        call("masked_softmax", logits.shape, logits, mask),
        jax.nn.softmax(jnp.where(mask[:, :, None] > 0, logits, np.finfo(np.float32).min), axis=-1),
        rtol=2e-6, atol=1e-9)
  for x_shape, features in DENSE_SHAPES:
    x = _random(rng, int(np.prod(x_shape[:-1])), x_shape[-1])
    kernel = _random(rng, x_shape[-1], features)
    np.testing.assert_allclose(call("dense", (x.shape[0], features), x, kernel),
                               jnp.dot(x, kernel), rtol=1e-5, atol=1e-4)


def test_under_differentiation_the_products_are_the_einsums():
  """Value and gradient bit for bit the einsums' and jax's softmax (so training never depends
  on the kernels), while the same call outside differentiation runs the kernel."""
  rng = np.random.default_rng(0)
  rows, keys = _random(rng, 2, 2, 4, 16), _random(rng, 2, 2, 9, 16)
  x, kernel = _random(rng, 3, 16), _random(rng, 16, 24)
  causal = jnp.tril(jnp.ones((4, 4), jnp.float32))[None, None]         # [1, 1, T, S]

  def loss(products_fn, reference):
    return lambda a, b: jnp.sum(jnp.sin(products_fn(a, b))), \
        lambda a, b: jnp.sum(jnp.sin(reference(a, b)))

  for fn, ref, args in [
      (products.logits, lambda a, b: jnp.einsum("bkrh,bksh->bkrs", a, b), (rows, keys)),
      (products.context, lambda a, b: jnp.einsum("bkrs,bksh->bkrh", a, b),
       (jax.nn.softmax(_random(rng, 2, 2, 4, 9)), keys)),
      (products.dense, jnp.dot, (x, kernel)),
      (lambda a, _: products.softmax(a), lambda a, _: jax.nn.softmax(a, axis=-1),
       (_random(rng, 2, 2, 4, 9), keys)),
      (lambda a, _: products.masked_softmax(a, causal),
       lambda a, _: jax.nn.softmax(jnp.where(causal[:, :, None] > 0, a, jnp.finfo(a.dtype).min),
                                   axis=-1),
       (_random(rng, 2, 2, 3, 4, 4), keys))]:
    assert _calls_kernel(fn, *args)
    ours, theirs = loss(fn, ref)
    got = jax.jit(jax.value_and_grad(ours, argnums=(0, 1)))(*args)
    want = jax.jit(jax.value_and_grad(theirs, argnums=(0, 1)))(*args)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
      np.testing.assert_array_equal(g, w)


def test_vmap_over_the_kernels():
  rng = np.random.default_rng(1)
  rows, keys = _random(rng, 3, 2, 2, 2, 8), _random(rng, 3, 2, 2, 6, 8)
  x, kernel = _random(rng, 3, 4, 8), _random(rng, 8, 24)
  np.testing.assert_allclose(jax.jit(jax.vmap(products.logits))(rows, keys),
                             jnp.einsum("vbkrh,vbksh->vbkrs", rows, keys), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(jax.jit(jax.vmap(products.dense, in_axes=(0, None)))(x, kernel),
                             jnp.einsum("vmd,df->vmf", x, kernel), rtol=1e-5, atol=1e-5)


def test_kernels_called_from_several_threads_at_once_match_the_einsums():
  """Four threads run the kernels' programs at once, so their jobs meet on the kernels' own
  helper threads (cpu_kernels.cc `Helpers`): each caller still gets its own results, whole."""
  rng = np.random.default_rng(7)
  inputs = [(_random(rng, 4, 2, 512, 64), _random(rng, 4, 2, 8, 64),
             _random(rng, 8, 256), _random(rng, 256, 1000)) for _ in range(4)]

  @jax.jit
  def step(keys, rows, x, kernel):
    logits = products.logits(rows, keys)                                 # [B, K, R, S]
    weights = products.softmax(logits)
    return logits, products.context(weights, keys), products.dense(x, kernel)

  assert _calls_kernel(step, *inputs[0])
  want = [jax.block_until_ready(step(*args)) for args in inputs]

  def run(i):
    got = [step(*inputs[i]) for _ in range(25)]
    return [jax.tree.map(np.asarray, g) for g in got]

  with concurrent.futures.ThreadPoolExecutor(max_workers=4) as threads:
    results = list(threads.map(run, range(4)))
  for i, runs in enumerate(results):
    for got in runs:
      for g, w in zip(got, want[i]):
        np.testing.assert_array_equal(g, w)


def test_only_cpu_programs_contain_the_kernels():
  rows, keys = jnp.ones((2, 2, 2, 8)), jnp.ones((2, 2, 5, 8))
  traced = jax.jit(products.logits).trace(rows, keys)
  assert "GqaT5GroupedLogits" in traced.lower(lowering_platforms=("cpu",)).as_text()
  for platform in ("tpu", "cuda"):
    assert "custom_call" not in traced.lower(lowering_platforms=(platform,)).as_text()


@pytest.mark.parametrize("case", ["bfloat16", "too_many_rows", "head_dim_not_multiple_of_8"])
def test_shapes_the_kernels_do_not_take_stay_einsums(case):
  rows, keys = jnp.ones((1, 1, 2, 8)), jnp.ones((1, 1, 5, 8))
  if case == "bfloat16":
    rows, keys = rows.astype(jnp.bfloat16), keys.astype(jnp.bfloat16)
  elif case == "too_many_rows":
    rows = jnp.ones((1, 1, products.MAX_KERNEL_ROWS + 1, 8))
  else:
    rows, keys = jnp.ones((1, 1, 2, 12)), jnp.ones((1, 1, 5, 12))
  assert not _calls_kernel(products.logits, rows, keys)
  assert _calls_kernel(products.logits, jnp.ones((1, 1, 2, 8)), jnp.ones((1, 1, 5, 8)))


def test_a_training_length_projection_stays_a_matrix_product():
  x, kernel = jnp.ones((4, 32, 16)), jnp.ones((16, 24))   # 128 rows
  assert not _calls_kernel(products.dense, x, kernel)


def test_grouped_decode_with_kernels_matches_the_einsum_path(monkeypatch):
  """Greedy decoding of a tiny GQA model (prefilled cross-attention, cached self-attention):
  the kernels' program gives the einsum program's logits and tokens."""
  config = tiny_configs.tiny_config("network", num_kv_heads=2)   # N = 4, K = 2, H = 8
  model = EncoderDecoderModel(Transformer(config))
  params = model.get_initial_variables(jax.random.PRNGKey(0), {
      "encoder_input_tokens": (2, 6), "decoder_input_tokens": (2, 5)})["params"]
  batch = {"encoder_input_tokens": jnp.array([[5, 6, 7, 8, 1, 0], [9, 3, 4, 1, 0, 0]]),
           "decoder_input_tokens": jnp.zeros((2, 5), jnp.int32)}

  chosen = []
  use_kernel = products._use_kernel
  monkeypatch.setattr(products, "_use_kernel", lambda *args: chosen.append(use_kernel(*args))
                      or chosen[-1])

  def decode():
    return model.predict_batch(params, batch)

  def scores():
    return jax.jit(model.score_batch)(params, dict(batch, decoder_target_tokens=jnp.array(
        [[4, 5, 6, 1, 0], [7, 1, 0, 0, 0]]), decoder_loss_weights=jnp.array(
        [[1, 1, 1, 1, 0], [1, 1, 0, 0, 0]])))

  tokens, score = decode(), scores()
  assert chosen and all(chosen), "the tiny model's products should all take the kernels"
  declined = []
  monkeypatch.setattr(products, "_use_kernel", lambda *args: declined.append(args) and False)
  jax.clear_caches()  # the model's jitted prediction would otherwise reuse the kernels' program
  reference_tokens, reference_score = decode(), scores()
  assert declined, "the einsum reference was not traced again"
  np.testing.assert_array_equal(tokens, reference_tokens)
  np.testing.assert_allclose(score, reference_score, rtol=1e-5, atol=1e-5)


def test_the_core_never_repeats_keys_to_query_heads_with_the_kernels():
  """The CPU program of a grouped decode step reads K-head keys and values: no operand of the
  kernels has N heads."""
  q = jnp.ones((2, 1, 2, 4, 8))          # [B, T, K, G, H]: N = 8 query heads, K = 2
  k = v = jnp.ones((2, 2, 16, 8))        # [B, K, S, H]
  text = jax.jit(lambda q, k, v: attention.dot_product_attention(q, k, v)).trace(
      q, k, v).lower(lowering_platforms=("cpu",)).as_text()
  assert "GqaT5GroupedLogits" in text and "GqaT5GroupedContext" in text
  assert "tensor<2x8x16x8xf32>" not in text   # keys repeated to N = 8 heads would be this


def _run(code: str, env: dict) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=600)


def test_no_compiler_falls_back_with_one_warning_or_fails_when_required(tmp_path):
  code = """
      import jax.numpy as jnp, numpy as np
      from gqa_t5.model import products
      rows, keys = jnp.ones((1, 1, 2, 8)), jnp.ones((1, 1, 5, 8))
      out = products.logits(rows, keys) + products.logits(rows, keys)
      np.testing.assert_allclose(out, 2 * jnp.einsum("bkrh,bksh->bkrs", rows, keys))
      print("einsums ok")
  """
  env = dict(os.environ, CXX=str(tmp_path / "no-such-compiler"),
             GQA_T5_KERNEL_CACHE=str(tmp_path / "cache"), PYTHONPATH=str(REPO))
  env.pop(cpu_kernels.ENV, None)
  auto = _run(code, env)
  assert auto.returncode == 0, auto.stderr[-3000:]
  assert "einsums ok" in auto.stdout
  assert auto.stderr.count("the CPU decode kernels are unavailable") == 1, auto.stderr[-3000:]
  assert "no C++ compiler" in auto.stderr
  required = _run(code, dict(env, **{cpu_kernels.ENV: "1"}))
  assert required.returncode != 0
  assert "KernelUnavailableError" in required.stderr and "no C++ compiler" in required.stderr
  assert not list((tmp_path / "cache").glob("*.so"))


def test_the_build_is_cached_per_source_and_left_whole(tmp_path, monkeypatch):
  compiler = cpu_kernels._compiler()
  monkeypatch.setenv(cpu_kernels.CACHE_ENV, str(tmp_path))
  path = cpu_kernels.library_path(compiler)
  assert path.parent == tmp_path and path.name.startswith("cpu_kernels-")
  assert cpu_kernels.library_path(compiler) == path        # stable for the same inputs
  monkeypatch.setattr(cpu_kernels, "SOURCE", tmp_path / "broken.cc")
  (tmp_path / "broken.cc").write_text("this is not C++\n")
  broken = cpu_kernels.library_path(compiler)
  assert broken != path                                     # another source, another file
  with pytest.raises(RuntimeError, match="failed"):
    cpu_kernels.build(compiler, broken)
  assert sorted(p.name for p in tmp_path.iterdir()) == ["broken.cc"]   # no half-written file
