"""Micro-benchmark: formulations of the attention core's two grouped products on this backend.

Not part of the package (issue 23's study). Times one jitted function over `layers` caches
(so that the larger shapes stream their caches from memory; the smallest fit the last-level cache
and show fractions above 1) per formulation, all in one
process, interleaved repeat by repeat, and prints each one's best time as a ratio to the current
einsum and as a fraction of the memory roofline (key/value bytes / bandwidth measured by a
read-dominated sum in the same process).

`current` is the core's einsum before issue 23 ('btkgh,bksh->bkgts'), `package` the core as the
package has it now: on a CPU in float32, the custom calls of gqa_t5/model/cpu_kernels.cc
(gqa_t5/model/products.py; GQA_T5_CPU_KERNELS=0 makes it the rows einsum).

  PYTHONPATH=. python scripts/attention_core_bench.py          # the issue's shapes, f32 + bf16
  PYTHONPATH=. python scripts/attention_core_bench.py --t 1 --s 2048 --dtype float32 \
      --forms current,package,per_group,gemv_logits
"""

import argparse
import itertools
import time

import jax
import jax.numpy as jnp
import numpy as np

from gqa_t5.benchmarks import bandwidth
from gqa_t5.model import attention


def _softmax_masked(logits, mask):
  logits = jnp.where(mask, logits, jnp.finfo(logits.dtype).min)
  return jax.nn.softmax(logits.astype(jnp.float32), axis=-1)


# Every formulation: (q [B,T,K,G,H], k, v in its layout, mask [B,1,T,S]) -> context [B,T,K,G,H].
# k/v layout "bksh" unless the name says otherwise.

def current(q, k, v, mask):
  logits = jnp.einsum("btkgh,bksh->bkgts", q, k)
  w = _softmax_masked(logits, mask[:, :, None]).astype(q.dtype)
  return jnp.einsum("bkgts,bksh->btkgh", w, v)


def rows_tg(q, k, v, mask):
  """[T*G] as the row dim of one (B, K)-batched matmul: R = T*G, T outer."""
  b, t, kk, g, h = q.shape
  qr = q.transpose(0, 2, 1, 3, 4).reshape(b, kk, t * g, h)           # [B, K, R, H]
  logits = jnp.einsum("bkrh,bksh->bkrs", qr, k)                      # [B, K, R, S]
  m = jnp.repeat(mask, g, axis=2) if t > 1 else mask                # [B, 1, R, S]
  w = _softmax_masked(logits, m).astype(q.dtype)
  ctx = jnp.einsum("bkrs,bksh->bkrh", w, v)                          # [B, K, R, H]
  return ctx.reshape(b, kk, t, g, h).transpose(0, 2, 1, 3, 4)


def package(q, k, v, mask):
  """The package's core as it is now (rows R = G*T, G outer)."""
  return attention.dot_product_attention(q, k, v, mask=mask, dtype=q.dtype)


def keys_major(q, k, v, mask):
  """The cache as the matmul's big (row) operand: [S,H]@[H,R] and [H,S]@[S,R]."""
  b, t, kk, g, h = q.shape
  qr = q.transpose(0, 2, 1, 3, 4).reshape(b, kk, t * g, h)
  logits = jnp.einsum("bksh,bkrh->bksr", k, qr)                      # [B, K, S, R]
  logits = logits.swapaxes(-1, -2)                                   # [B, K, R, S]
  m = jnp.repeat(mask, g, axis=2) if t > 1 else mask
  w = _softmax_masked(logits, m).astype(q.dtype)
  ctx = jnp.einsum("bksh,bkrs->bkhr", v, w)                          # [B, K, H, R]
  return ctx.swapaxes(-1, -2).reshape(b, kk, t, g, h).transpose(0, 2, 1, 3, 4)


def group_first(q, k, v, mask):
  logits = jnp.einsum("btkgh,bksh->bgkts", q, k)
  w = _softmax_masked(logits, mask[:, None]).astype(q.dtype)
  return jnp.einsum("bgkts,bksh->btkgh", w, v)


def dot_general(q, k, v, mask):
  b, t, kk, g, h = q.shape
  qr = q.transpose(0, 2, 1, 3, 4).reshape(b, kk, t * g, h)
  logits = jax.lax.dot_general(qr, k, (((3,), (3,)), ((0, 1), (0, 1))))  # [B, K, R, S]
  m = jnp.repeat(mask, g, axis=2) if t > 1 else mask
  w = _softmax_masked(logits, m).astype(q.dtype)
  ctx = jax.lax.dot_general(w, v, (((3,), (2,)), ((0, 1), (0, 1))))      # [B, K, R, H]
  return ctx.reshape(b, kk, t, g, h).transpose(0, 2, 1, 3, 4)


def multiply_reduce(q, k, v, mask):
  """Broadcast multiply + sum: one fused pass per product (materialises [B,K,G,T,S,H] in jaxpr)."""
  qq = q.transpose(0, 2, 3, 1, 4)[:, :, :, :, None, :]              # [B, K, G, T, 1, H]
  logits = jnp.sum(qq * k[:, :, None, None], axis=-1, dtype=jnp.float32)  # [B, K, G, T, S]
  w = _softmax_masked(logits, mask[:, :, None]).astype(q.dtype)
  ctx = jnp.sum(w[..., None] * v[:, :, None, None], axis=-2, dtype=jnp.float32)  # [B,K,G,T,H]
  return ctx.astype(q.dtype).transpose(0, 3, 1, 2, 4)


def per_group(q, k, v, mask):
  """G separate matrix-vector products (MHA-like gemv per group member), stacked."""
  g = q.shape[3]
  outs = [current(q[:, :, :, i:i + 1], k, v, mask) for i in range(g)]
  return jnp.concatenate(outs, axis=3)


def _rows_logits(q, k):
  b, t, kk, g, h = q.shape
  qr = q.transpose(0, 2, 3, 1, 4).reshape(b, kk, g * t, h)
  return jnp.einsum("bkrh,bksh->bkrs", qr, k).reshape(b, kk, g, t, -1)   # [B, K, G, T, S]


def _rows_context(w, v):  # w [B, K, G, T, S]
  b, kk, g, t, s = w.shape
  ctx = jnp.einsum("bkrs,bksh->bkrh", w.reshape(b, kk, g * t, s), v)
  return ctx.reshape(b, kk, g, t, -1).transpose(0, 3, 1, 2, 4)


def _group_logits(q, k):  # one matrix-vector product per group member
  return jnp.stack([jnp.einsum("btkh,bksh->bkts", q[:, :, :, i], k)
                    for i in range(q.shape[3])], axis=2)


def _group_context(w, v):
  return jnp.stack([jnp.einsum("bkts,bksh->btkh", w[:, :, i], v)
                    for i in range(w.shape[2])], axis=3)


def gemv_logits(q, k, v, mask):
  """Logits as G matrix-vector products, the weighted sum as the rows matmul."""
  w = _softmax_masked(_group_logits(q, k), mask[:, :, None]).astype(q.dtype)
  return _rows_context(w, v)


def gemv_context(q, k, v, mask):
  """Logits as the rows matmul, the weighted sum as G matrix-vector products."""
  w = _softmax_masked(_rows_logits(q, k), mask[:, :, None]).astype(q.dtype)
  return _group_context(w, v)


def khs_layout(q, k, v, mask):
  """Caches as [B, K, H, S]."""
  logits = jnp.einsum("btkgh,bkhs->bkgts", q, k)
  w = _softmax_masked(logits, mask[:, :, None]).astype(q.dtype)
  return jnp.einsum("bkgts,bkhs->btkgh", w, v)


def skh_layout(q, k, v, mask):
  """Caches as [B, S, K, H] (the projection's own layout)."""
  logits = jnp.einsum("btkgh,bskh->bkgts", q, k)
  w = _softmax_masked(logits, mask[:, :, None]).astype(q.dtype)
  return jnp.einsum("bkgts,bskh->btkgh", w, v)


FORMS = {"current": (current, "bksh"), "package": (package, "bksh"),
         "rows_tg": (rows_tg, "bksh"),
         "keys_major": (keys_major, "bksh"), "group_first": (group_first, "bksh"),
         "dot_general": (dot_general, "bksh"), "multiply_reduce": (multiply_reduce, "bksh"),
         "per_group": (per_group, "bksh"), "gemv_logits": (gemv_logits, "bksh"),
         "gemv_context": (gemv_context, "bksh"), "khs_layout": (khs_layout, "bkhs"),
         "skh_layout": (skh_layout, "bskh")}


def layout(x, name):  # x [L, B, K, S, H]
  if name == "bkhs":
    return x.swapaxes(-1, -2)
  if name == "bskh":
    return x.transpose(0, 1, 3, 2, 4)
  return x


def _time(fn):
  start = time.perf_counter()
  fn()
  return time.perf_counter() - start


def run_case(b, t, n, kv, s, h, layers, dtype, repeats, forms):
  g = n // kv
  rng = np.random.RandomState(0)
  q = jnp.asarray(rng.randn(layers, b, t, kv, g, h), dtype)
  k = jnp.asarray(rng.randn(layers, b, kv, s, h), dtype)
  v = jnp.asarray(rng.randn(layers, b, kv, s, h), dtype)
  mask = jnp.asarray(rng.rand(b, 1, t, s) > 0.1)
  fns, args, ref = {}, {}, None
  for name in forms:
    fn, lay = FORMS[name]

    def unrolled(qs, ks, vs, fn=fn):
      # One layer after another, as the unscanned decoder runs them.
      return sum(fn(q, k, v, mask).astype(jnp.float32) for q, k, v in zip(qs, ks, vs))

    fns[name] = jax.jit(unrolled)
    args[name] = (list(q), list(layout(k, lay)), list(layout(v, lay)))
    out = np.asarray(fns[name](*args[name]))
    if ref is None:
      ref = out
    tol = 1e-3 if dtype == jnp.float32 else 0.1
    err = np.max(np.abs(out - ref)) / (np.max(np.abs(ref)) + 1e-9)
    assert err < tol, f"{name}: relative error {err}"
  best = {name: float("inf") for name in forms}
  for _ in range(repeats):
    for name in forms:
      best[name] = min(best[name], _time(lambda: jax.block_until_ready(fns[name](*args[name]))))
  kv_bytes = 2 * layers * b * kv * s * h * jnp.dtype(dtype).itemsize
  return best, kv_bytes


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--b", type=int, default=8)
  p.add_argument("--n", type=int, default=8)
  p.add_argument("--h", type=int, default=64)
  p.add_argument("--t", default="1,16", help="query lengths")
  p.add_argument("--s", default="128,512,2048", help="key lengths")
  p.add_argument("--g", default="1,2,4,8")
  p.add_argument("--dtype", default="float32,bfloat16")
  p.add_argument("--layers", type=int, default=6)
  p.add_argument("--repeats", type=int, default=7)
  p.add_argument("--forms", default=",".join(FORMS))
  a = p.parse_args()
  forms = a.forms.split(",")
  bw = bandwidth.measure_bandwidth(512 * 2**20)
  print(f"backend {jax.default_backend()}, bandwidth {bw / 1e9:.1f} GB/s; ratio = time / "
        f"current's time (lower is faster); roof = roofline time / time")
  print(f"{'dtype':>8} {'T':>3} {'S':>5} {'G':>2} {'cur ms':>7} {'roof':>5}  "
        + " ".join(f"{f[:11]:>11}" for f in forms))
  for dt, t, s, g in itertools.product(a.dtype.split(","), a.t.split(","), a.s.split(","),
                                       a.g.split(",")):
    dtype = jnp.dtype(dt)
    t, s, g = int(t), int(s), int(g)
    best, kv_bytes = run_case(a.b, t, a.n, a.n // g, s, a.h, a.layers, dtype, a.repeats, forms)
    roof = kv_bytes / bw
    cur = best["current"]
    print(f"{dt:>8} {t:>3} {s:>5} {g:>2} {cur * 1e3:>7.3f} {roof / cur:>5.2f}  "
          + " ".join(f"{best[f] / cur:.2f}/{roof / best[f]:.2f}".rjust(11)
                     for f in forms), flush=True)


if __name__ == "__main__":
  main()
