// The grouped attention core's two products as XLA:CPU custom calls (jax.ffi), float32.
//
// Built on first use by gqa_t5/model/cpu_kernels.py (g++ -O3 -march=native) and called by
// gqa_t5/model/products.py for grouped decode steps on a CPU. Why they exist (issue 23): with
// G = N/K >= 2 query rows per key/value head, XLA:CPU runs the two products as batched matrix
// products with 2-8 rows at a quarter of the memory bandwidth, so a GQA decode step was slower
// than MHA's although it reads fewer bytes. These kernels read each cached key and value once
// per row (from L1/L2 after the first row of a head) with every row's FMAs in registers.
//
// The third, RowsMatmul, is a decode step's dense projections (queries, keys, values, output,
// MLP, logits: x [M, D] with M = B*T a few rows): XLA:CPU packs the whole weight matrix for a
// general matrix product, so those ran at a third of the bandwidth; this one streams each weight
// once, 16 columns at a time, with the rows' accumulators in registers.
//
// Shapes (row-major; leading dims folded into P = B*K, as products.py passes them):
//   GroupedLogits:  rows [P, R, H], keys [P, S, H]      -> logits  [P, R, S]
//   GroupedContext: weights [P, R, S], values [P, S, H] -> context [P, R, H]
//   RowsMatmul:     x [M, D], w [D, N]                   -> y [M, N]
// R = G*T query rows per key/value head, S key length, H head dim (a multiple of 8).

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <memory>
#include <thread>

#include "xla/ffi/api/ffi.h"

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define GQA_T5_AVX2 1
#endif

namespace ffi = xla::ffi;

namespace {

// Runs body(i) for i in [0, n) on the caller and the XLA:CPU intra-op pool. The caller claims
// work too and waits only for items already claimed, so a pool busy elsewhere cannot deadlock
// it; a task that starts after the last item was claimed returns without touching `body`.
template <typename F>
void ParallelFor(ffi::ThreadPool& pool, int64_t n, const F& body) {
  const int64_t threads = std::min<int64_t>(std::max<int64_t>(1, pool.num_threads()), n);
  if (threads <= 1) {
    for (int64_t i = 0; i < n; ++i) body(i);
    return;
  }
  struct State {
    std::atomic<int64_t> next{0};
    std::atomic<int64_t> done{0};
  };
  auto state = std::make_shared<State>();
  const F* fn = &body;
  auto run = [state, fn, n]() {
    int64_t i;
    while ((i = state->next.fetch_add(1, std::memory_order_relaxed)) < n) {
      (*fn)(i);
      state->done.fetch_add(1, std::memory_order_release);
    }
  };
  for (int64_t t = 1; t < threads; ++t) pool.Schedule(decltype(run)(run));
  run();
  while (state->done.load(std::memory_order_acquire) < n) std::this_thread::yield();
}

template <typename Dims>
int64_t LeadingSize(const Dims& dims) {
  int64_t p = 1;
  for (size_t i = 0; i + 2 < dims.size(); ++i) p *= dims[i];
  return p;
}

#ifdef GQA_T5_AVX2
// [sum(a), sum(b), sum(c), sum(d)]
inline __m128 Sum4(__m256 a, __m256 b, __m256 c, __m256 d) {
  const __m256 ab = _mm256_hadd_ps(a, b), cd = _mm256_hadd_ps(c, d);
  const __m256 abcd = _mm256_hadd_ps(ab, cd);
  return _mm_add_ps(_mm256_castps256_ps128(abcd), _mm256_extractf128_ps(abcd, 1));
}

// logits[r + i, s + j] for rows i < 2 and keys j < 4: 8 accumulators in registers.
inline void LogitsTile2x4(const float* q, const float* k, float* out, int64_t H, int64_t S) {
  __m256 a00 = _mm256_setzero_ps(), a01 = a00, a02 = a00, a03 = a00;
  __m256 a10 = a00, a11 = a00, a12 = a00, a13 = a00;
  for (int64_t h = 0; h < H; h += 8) {
    const __m256 k0 = _mm256_loadu_ps(k + h), k1 = _mm256_loadu_ps(k + H + h);
    const __m256 k2 = _mm256_loadu_ps(k + 2 * H + h), k3 = _mm256_loadu_ps(k + 3 * H + h);
    const __m256 q0 = _mm256_loadu_ps(q + h), q1 = _mm256_loadu_ps(q + H + h);
    a00 = _mm256_fmadd_ps(q0, k0, a00); a01 = _mm256_fmadd_ps(q0, k1, a01);
    a02 = _mm256_fmadd_ps(q0, k2, a02); a03 = _mm256_fmadd_ps(q0, k3, a03);
    a10 = _mm256_fmadd_ps(q1, k0, a10); a11 = _mm256_fmadd_ps(q1, k1, a11);
    a12 = _mm256_fmadd_ps(q1, k2, a12); a13 = _mm256_fmadd_ps(q1, k3, a13);
  }
  _mm_storeu_ps(out, Sum4(a00, a01, a02, a03));
  _mm_storeu_ps(out + S, Sum4(a10, a11, a12, a13));
}

inline void LogitsTile1x4(const float* q, const float* k, float* out, int64_t H) {
  __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
  for (int64_t h = 0; h < H; h += 8) {
    const __m256 q0 = _mm256_loadu_ps(q + h);
    a0 = _mm256_fmadd_ps(q0, _mm256_loadu_ps(k + h), a0);
    a1 = _mm256_fmadd_ps(q0, _mm256_loadu_ps(k + H + h), a1);
    a2 = _mm256_fmadd_ps(q0, _mm256_loadu_ps(k + 2 * H + h), a2);
    a3 = _mm256_fmadd_ps(q0, _mm256_loadu_ps(k + 3 * H + h), a3);
  }
  _mm_storeu_ps(out, Sum4(a0, a1, a2, a3));
}

// context[r, h0 : h0 + 8*HB] = sum_s w[r, s] * v[s, h0 : ...] for one row.
template <int HB>
inline void ContextRow(const float* w, const float* v, float* out, int64_t S, int64_t H) {
  __m256 acc[HB];
  for (int j = 0; j < HB; ++j) acc[j] = _mm256_setzero_ps();
  for (int64_t s = 0; s < S; ++s) {
    const __m256 a = _mm256_broadcast_ss(w + s);
    for (int j = 0; j < HB; ++j) acc[j] = _mm256_fmadd_ps(a, _mm256_loadu_ps(v + s * H + 8 * j), acc[j]);
  }
  for (int j = 0; j < HB; ++j) _mm256_storeu_ps(out + 8 * j, acc[j]);
}

// y[m : m + MB, n0 : n1] += x[m : m + MB, d : d + 4] @ w[d : d + 4, n0 : n1] for n1 - n0 a
// multiple of 8: the 4*MB broadcast x values stay in registers while the four weight rows
// stream past (from L1 after the first row block of x).
template <int MB>
inline void MatmulQuad(const float* x, const float* w, float* y, int64_t m, int64_t d, int64_t n0,
                       int64_t n1, int64_t D, int64_t N) {
  __m256 a[MB][4];
  for (int i = 0; i < MB; ++i) {
    for (int e = 0; e < 4; ++e) a[i][e] = _mm256_broadcast_ss(x + (m + i) * D + d + e);
  }
  const float* w0 = w + d * N;
  for (int64_t n = n0; n < n1; n += 8) {
    const __m256 v0 = _mm256_loadu_ps(w0 + n), v1 = _mm256_loadu_ps(w0 + N + n);
    const __m256 v2 = _mm256_loadu_ps(w0 + 2 * N + n), v3 = _mm256_loadu_ps(w0 + 3 * N + n);
    for (int i = 0; i < MB; ++i) {
      float* yr = y + (m + i) * N + n;
      __m256 acc = _mm256_loadu_ps(yr);
      acc = _mm256_fmadd_ps(a[i][0], v0, acc);
      acc = _mm256_fmadd_ps(a[i][1], v1, acc);
      acc = _mm256_fmadd_ps(a[i][2], v2, acc);
      acc = _mm256_fmadd_ps(a[i][3], v3, acc);
      _mm256_storeu_ps(yr, acc);
    }
  }
}
#endif  // GQA_T5_AVX2

// Columns [n0, n1) of y = x @ w, accumulated in y (M x (n1 - n0) floats, in L1/L2). The weight
// is read four rows at a time along their contiguous columns: four sequential streams, which
// this kind of CPU prefetches; walking a register tile down the rows instead (N floats apart)
// ran at a third of the bandwidth.
void MatmulColumns(const float* x, const float* w, float* y, int64_t M, int64_t D, int64_t N,
                   int64_t n0, int64_t n1) {
  for (int64_t m = 0; m < M; ++m) std::fill(y + m * N + n0, y + m * N + n1, 0.0f);
  int64_t d = 0;
#ifdef GQA_T5_AVX2
  const int64_t vector_end = n0 + (n1 - n0) / 8 * 8;
  for (; d + 4 <= D; d += 4) {
    int64_t m = 0;
    for (; m + 2 <= M; m += 2) MatmulQuad<2>(x, w, y, m, d, n0, vector_end, D, N);
    for (; m < M; ++m) MatmulQuad<1>(x, w, y, m, d, n0, vector_end, D, N);
    for (int64_t m = 0; m < M; ++m) {
      for (int64_t j = vector_end; j < n1; ++j) {
        for (int64_t e = d; e < d + 4; ++e) y[m * N + j] += x[m * D + e] * w[e * N + j];
      }
    }
  }
#endif
  for (; d < D; ++d) {
    for (int64_t m = 0; m < M; ++m) {
      const float a = x[m * D + d];
      for (int64_t j = n0; j < n1; ++j) y[m * N + j] += a * w[d * N + j];
    }
  }
}

float Dot(const float* a, const float* b, int64_t n) {
  float acc = 0.0f;
  for (int64_t i = 0; i < n; ++i) acc += a[i] * b[i];
  return acc;
}

// Rows r0 (and r0 + 1 when `pair`) of one key/value head's logits, streaming all S keys.
void LogitsRows(const float* q, const float* k, float* out, int64_t r0, bool pair, int64_t S,
                int64_t H) {
  int64_t s = 0;
#ifdef GQA_T5_AVX2
  for (; s + 4 <= S; s += 4) {
    if (pair) {
      LogitsTile2x4(q + r0 * H, k + s * H, out + r0 * S + s, H, S);
    } else {
      LogitsTile1x4(q + r0 * H, k + s * H, out + r0 * S + s, H);
    }
  }
#endif
  for (; s < S; ++s) {
    out[r0 * S + s] = Dot(q + r0 * H, k + s * H, H);
    if (pair) out[(r0 + 1) * S + s] = Dot(q + (r0 + 1) * H, k + s * H, H);
  }
}

void ContextRowAll(const float* w, const float* v, float* out, int64_t S, int64_t H) {
  int64_t h0 = 0;
#ifdef GQA_T5_AVX2
  for (; h0 + 64 <= H; h0 += 64) ContextRow<8>(w, v + h0, out + h0, S, H);
  for (; h0 + 32 <= H; h0 += 32) ContextRow<4>(w, v + h0, out + h0, S, H);
  for (; h0 + 8 <= H; h0 += 8) ContextRow<1>(w, v + h0, out + h0, S, H);
#endif
  for (int64_t h = h0; h < H; ++h) {
    float acc = 0.0f;
    for (int64_t s = 0; s < S; ++s) acc += w[s] * v[s * H + h];
    out[h] = acc;
  }
}

}  // namespace

ffi::Error GroupedLogitsImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> rows,
                             ffi::Buffer<ffi::F32> keys, ffi::ResultBuffer<ffi::F32> logits) {
  const auto rd = rows.dimensions();
  const auto kd = keys.dimensions();
  if (rd.size() < 3 || kd.size() != rd.size() || rd[rd.size() - 1] != kd[kd.size() - 1] ||
      LeadingSize(rd) != LeadingSize(kd)) {
    return ffi::Error::InvalidArgument("GroupedLogits: rows [P, R, H] and keys [P, S, H] expected");
  }
  const int64_t P = LeadingSize(rd), R = rd[rd.size() - 2], H = rd[rd.size() - 1];
  const int64_t S = kd[kd.size() - 2];
  const float* q = rows.typed_data();
  const float* k = keys.typed_data();
  float* out = logits->typed_data();
  const int64_t pairs = (R + 1) / 2;  // items: (head, row pair), the last maybe a single row
  ParallelFor(pool, P * pairs, [&](int64_t item) {
    const int64_t p = item / pairs, r0 = (item % pairs) * 2;
    LogitsRows(q + p * R * H, k + p * S * H, out + p * R * S, r0, r0 + 1 < R, S, H);
  });
  return ffi::Error::Success();
}

ffi::Error GroupedContextImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> weights,
                              ffi::Buffer<ffi::F32> values, ffi::ResultBuffer<ffi::F32> context) {
  const auto wd = weights.dimensions();
  const auto vd = values.dimensions();
  if (wd.size() < 3 || vd.size() != wd.size() || wd[wd.size() - 1] != vd[vd.size() - 2] ||
      LeadingSize(wd) != LeadingSize(vd)) {
    return ffi::Error::InvalidArgument(
        "GroupedContext: weights [P, R, S] and values [P, S, H] expected");
  }
  const int64_t P = LeadingSize(wd), R = wd[wd.size() - 2], S = wd[wd.size() - 1];
  const int64_t H = vd[vd.size() - 1];
  const float* w = weights.typed_data();
  const float* v = values.typed_data();
  float* out = context->typed_data();
  ParallelFor(pool, P * R, [&](int64_t item) {  // items: (head, row)
    const int64_t p = item / R, r = item % R;
    ContextRowAll(w + (p * R + r) * S, v + p * S * H, out + (p * R + r) * H, S, H);
  });
  return ffi::Error::Success();
}

ffi::Error RowsMatmulImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w,
                          ffi::ResultBuffer<ffi::F32> y) {
  const auto xd = x.dimensions();
  const auto wd = w.dimensions();
  if (xd.size() != 2 || wd.size() != 2 || xd[1] != wd[0]) {
    return ffi::Error::InvalidArgument("RowsMatmul: x [M, D] and w [D, N] expected");
  }
  const int64_t M = xd[0], D = xd[1], N = wd[1];
  const float* xp = x.typed_data();
  const float* wp = w.typed_data();
  float* yp = y->typed_data();
  // Items: column blocks, four per thread (at least 256 columns: long sequential runs).
  const int64_t threads = std::max<int64_t>(1, pool.num_threads());
  const int64_t block = std::max<int64_t>(256, (N / (4 * threads) + 7) / 8 * 8);
  ParallelFor(pool, (N + block - 1) / block, [&](int64_t item) {
    const int64_t n0 = item * block;
    MatmulColumns(xp, wp, yp, M, D, N, n0, std::min(N, n0 + block));
  });
  return ffi::Error::Success();
}

ffi::Error ThreadCountImpl(ffi::ThreadPool pool, ffi::ResultBuffer<ffi::S32> count) {
  count->typed_data()[0] = static_cast<int32_t>(pool.num_threads());
  return ffi::Error::Success();
}

// The three products' signature: the intra-op thread pool, two float32 operands, one result.
#define GQA_T5_PRODUCT_BINDING                                            \
  ffi::Ffi::Bind()                                                        \
      .Ctx<ffi::ThreadPool>()                                             \
      .Arg<ffi::Buffer<ffi::F32>>()                                       \
      .Arg<ffi::Buffer<ffi::F32>>()                                       \
      .Ret<ffi::Buffer<ffi::F32>>()

XLA_FFI_DEFINE_HANDLER_SYMBOL(GqaT5GroupedLogits, GroupedLogitsImpl, GQA_T5_PRODUCT_BINDING);
XLA_FFI_DEFINE_HANDLER_SYMBOL(GqaT5GroupedContext, GroupedContextImpl, GQA_T5_PRODUCT_BINDING);
XLA_FFI_DEFINE_HANDLER_SYMBOL(GqaT5RowsMatmul, RowsMatmulImpl, GQA_T5_PRODUCT_BINDING);

XLA_FFI_DEFINE_HANDLER_SYMBOL(GqaT5ThreadCount, ThreadCountImpl,
                              ffi::Ffi::Bind().Ctx<ffi::ThreadPool>().Ret<ffi::Buffer<ffi::S32>>());
