// A CPU decode step's products (and its attention softmax) as XLA:CPU custom calls (jax.ffi),
// float32.
//
// Built on first use by gqa_t5/model/cpu_kernels.py (g++ -O3 -march=native) and called by
// gqa_t5/model/products.py for grouped decode steps on a CPU. Why they exist (issue 23): with
// G = N/K >= 2 query rows per key/value head, XLA:CPU runs the two products as batched matrix
// products with 2-8 rows at a quarter of the memory bandwidth, so a GQA decode step was slower
// than MHA's although it reads fewer bytes. These kernels read each cached key and value from
// memory once, by one thread, for all the query rows of its head, with the rows' accumulators
// in registers.
//
// The third, RowsMatmul, is a decode step's dense projections (queries, keys, values, output,
// MLP, logits: x [M, D] with M = B*T a few rows): XLA:CPU packs the whole weight matrix for a
// general matrix product, so those ran at a third of the bandwidth; this one streams each weight
// once, a few rows at a time along their columns, for all rows of x, each thread reading its own
// contiguous range of the weight's rows.
//
// The fourth, Softmax, is the softmax between the two attention products in such a step: XLA's
// max, exp, sum and divide over the logits cost 0.5 ms of a step at 2,048 keys, for every K
// alike; this one makes one pass over each row while it sits in L1. MaskedSoftmax also does the
// attention mask's select, inside the same passes (XLA's select over the logits cost 85 us
// per cross-attention layer at 2,048 keys).
//
// Each kernel splits its work between the calling thread and the kernels' own helper threads
// (`Helpers`, below: as many threads in all as XLA:CPU's intra-op pool has).
//
// Each has three builds of its inner tiles, chosen at compile time by what -march=native offers:
// AVX-512 (16 lanes: the rows' tiles share each loaded key, value or weight vector; the
// fastest of the forms measured for issue 23), AVX2/FMA (8 lanes; Softmax: scalar) and portable
// scalar code.
// tests/test_cpu_kernels.py reaches every tile and tail of this machine's build, and compiles
// and checks the narrower builds too.
//
// Shapes (row-major; leading dims folded into P = B*K, as products.py passes them):
//   GroupedLogits:  rows [P, R, H], keys [P, S, H]      -> logits  [P, R, S]
//   GroupedContext: weights [P, R, S], values [P, S, H] -> context [P, R, H]
//   RowsMatmul:     x [M, D], w [D, N]                   -> y [M, N]
//   Softmax:        x [..., S]                           -> y [..., S]  (over S)
//   MaskedSoftmax:  x [B, K, G, T, S], mask [1|B, 1, T, S] -> y [B, K, G, T, S]
// R = G*T query rows per key/value head, S key length, H head dim (a multiple of 8).

#include <algorithm>
#include <cmath>
#include <limits>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <mutex>
#include <cstdint>
#include <memory>
#include <thread>
#include <vector>

#include "xla/ffi/api/ffi.h"

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define GQA_T5_AVX2 1
#endif

namespace ffi = xla::ffi;

namespace {

// The kernels' own helper threads, which spin for a while after each job before they sleep.
// XLA:CPU's intra-op pool threads sleep between a step's operations, and a sleeping one took about
// 50 us to start on a task (in a CPU-long MHA decode step, a quarter of the dense calls and every
// call of the logits weight waited that long for their second thread). A decode step calls these
// kernels every few to a hundred microseconds, so a spinning helper is already running when the
// next job is posted (late in 4-6% of those calls; the step 8-11% faster). Spinning yields the
// core to any other runnable thread, and stops after kSpin without a job.
class Helpers {
 public:
  struct Job {
    std::atomic<int64_t> next{0};
    std::atomic<int64_t> done{0};
    int64_t n = 0;
    void (*call)(const void*, int64_t) = nullptr;
    const void* body = nullptr;
    void Run() {
      int64_t i;
      while ((i = next.fetch_add(1, std::memory_order_relaxed)) < n) {
        call(body, i);
        done.fetch_add(1, std::memory_order_release);
      }
    }
  };

  // The process's helpers; never destroyed, so a helper never outlives its state.
  static Helpers& Get() {
    static Helpers* helpers = new Helpers();
    return *helpers;
  }

  // Starts helpers until there are `count` (at most one fewer than the CPU's threads); returns
  // how many there are.
  int Ensure(int count) {
    count = std::min(count, cpus_ - 1);
    std::lock_guard<std::mutex> lock(mu_);
    for (; started_ < count; ++started_) std::thread([this] { Loop(); }).detach();
    return started_;
  }

  void Post(const std::shared_ptr<Job>& job) {
    bool wake;
    {
      std::lock_guard<std::mutex> lock(mu_);
      current_ = job;
      generation_.fetch_add(1, std::memory_order_release);
      wake = sleeping_ > 0;
    }
    if (wake) cv_.notify_all();
  }

 private:
  static constexpr auto kSpin = std::chrono::microseconds(500);

  static void Pause() {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#endif
  }

  void Loop() {
    uint64_t seen = generation_.load(std::memory_order_acquire);
    for (;;) {
      auto deadline = std::chrono::steady_clock::now() + kSpin;
      for (int spins = 1; generation_.load(std::memory_order_acquire) == seen; ++spins) {
        Pause();
        if (spins % 64 != 0) continue;
        std::this_thread::yield();
        if (std::chrono::steady_clock::now() < deadline) continue;
        std::unique_lock<std::mutex> lock(mu_);
        ++sleeping_;
        cv_.wait(lock, [&] { return generation_.load(std::memory_order_relaxed) != seen; });
        --sleeping_;
        break;
      }
      std::shared_ptr<Job> job;
      {
        std::lock_guard<std::mutex> lock(mu_);
        job = current_;
        seen = generation_.load(std::memory_order_relaxed);
      }
      if (job) job->Run();
    }
  }

  // Read once: glibc reads it from /sys at every call (4 us, as long as a small kernel's work).
  const int cpus_ = static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
  std::mutex mu_;
  std::condition_variable cv_;
  std::shared_ptr<Job> current_;
  std::atomic<uint64_t> generation_{0};
  int sleeping_ = 0;
  int started_ = 0;
};

// Runs body(i) for i in [0, n) on the caller and the helpers, as many threads in all as the
// XLA:CPU intra-op pool has. The caller claims work too and waits only for items already
// claimed, so a helper busy with another caller's job cannot deadlock it.
template <typename F>
void ParallelFor(ffi::ThreadPool& pool, int64_t n, const F& body) {
  const int64_t threads = std::min<int64_t>(std::max<int64_t>(1, pool.num_threads()), n);
  Helpers& helpers = Helpers::Get();
  if (threads <= 1 || helpers.Ensure(static_cast<int>(threads - 1)) == 0) {
    for (int64_t i = 0; i < n; ++i) body(i);
    return;
  }
  auto job = std::make_shared<Helpers::Job>();
  job->n = n;
  job->call = [](const void* f, int64_t i) { (*static_cast<const F*>(f))(i); };
  job->body = &body;
  helpers.Post(job);
  job->Run();
  while (job->done.load(std::memory_order_acquire) < n) std::this_thread::yield();
}

// Runs body(i) for i in [0, n) as one contiguous range of items per thread, each range in order:
// a thread streams one region of memory, where items claimed one at a time put the threads on
// neighbouring blocks of the same head.
template <typename F>
void ParallelRanges(ffi::ThreadPool& pool, int64_t n, const F& body) {
  const int64_t parts = std::min<int64_t>(std::max<int64_t>(1, pool.num_threads()), n);
  ParallelFor(pool, parts, [&](int64_t part) {
    for (int64_t i = part * n / parts; i < (part + 1) * n / parts; ++i) body(i);
  });
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

#if defined(__AVX512F__)
// y[m : m + MB, n0 : n1] += x[m : m + MB, d : d + 8] @ w[d : d + 8, n0 : n1] for n1 - n0 a
// multiple of 16: eight weight rows stream past the rows' 8*MB broadcast x values. The first row
// block (`prefetch`, when eight more weight rows follow) also asks for the next eight weight rows
// into L2, so the next pass finds them there; later row blocks read these weights from L1.
template <int MB>
inline void MatmulOctet512(const float* x, const float* w, float* y, int64_t m, int64_t d,
                           int64_t n0, int64_t n1, int64_t D, int64_t N, bool prefetch) {
  __m512 a[MB][8];
  for (int i = 0; i < MB; ++i) {
    for (int e = 0; e < 8; ++e) a[i][e] = _mm512_set1_ps(x[(m + i) * D + d + e]);
  }
  const float* w0 = w + d * N;
  for (int64_t n = n0; n < n1; n += 16) {
    __m512 v[8];
    for (int e = 0; e < 8; ++e) v[e] = _mm512_loadu_ps(w0 + e * N + n);
    if (prefetch) {
      for (int e = 0; e < 8; ++e) _mm_prefetch(reinterpret_cast<const char*>(w0 + (8 + e) * N + n), _MM_HINT_T1);
    }
    for (int i = 0; i < MB; ++i) {
      float* yr = y + (m + i) * N + n;
      __m512 acc = _mm512_loadu_ps(yr);
      for (int e = 0; e < 8; ++e) acc = _mm512_fmadd_ps(a[i][e], v[e], acc);
      _mm512_storeu_ps(yr, acc);
    }
  }
}
#endif  // __AVX512F__

#if defined(__AVX512F__)
// [sum(a), sum(b), sum(c), sum(d)] of four 16-lane vectors.
inline __m128 Sum4x16(__m512 a, __m512 b, __m512 c, __m512 d) {
  const auto halves = [](__m512 x) {
    return _mm256_add_ps(_mm512_castps512_ps256(x),
                         _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(x), 1)));
  };
  return Sum4(halves(a), halves(b), halves(c), halves(d));
}

// logits[0, s : s + 4] of one row (H a multiple of 16): four accumulators, summed across lanes.
inline void LogitsRow512(const float* q, const float* k, float* out, int64_t H) {
  __m512 acc[4];
  for (int j = 0; j < 4; ++j) acc[j] = _mm512_setzero_ps();
  for (int64_t h = 0; h < H; h += 16) {
    const __m512 qv = _mm512_loadu_ps(q + h);
    for (int j = 0; j < 4; ++j) acc[j] = _mm512_fmadd_ps(qv, _mm512_loadu_ps(k + j * H + h), acc[j]);
  }
  _mm_storeu_ps(out, Sum4x16(acc[0], acc[1], acc[2], acc[3]));
}

// Lane j of the result is the sum of a[j]'s 16 lanes: a transpose-and-add tree (pairs of
// floats, of float pairs, of 128-bit lanes), 45 operations for 16 sums where summing each vector
// on its own takes twice as many; it is what keeps the many-row logits below from being
// compute-bound (issue 23: 18 against 13 GB/s at 8 rows).
inline __m512 Sum16x16(const __m512* a) {
  __m512 b[8], c[4], d[2];
  for (int i = 0; i < 8; ++i) {       // b[i]: a[2i], a[2i+1] partial sums, interleaved
    b[i] = _mm512_add_ps(_mm512_unpacklo_ps(a[2 * i], a[2 * i + 1]),
                         _mm512_unpackhi_ps(a[2 * i], a[2 * i + 1]));
  }
  for (int i = 0; i < 4; ++i) {       // c[i]: each 128-bit lane holds a[4i .. 4i+3] partial sums
    const __m512d lo = _mm512_castps_pd(b[2 * i]), hi = _mm512_castps_pd(b[2 * i + 1]);
    c[i] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(lo, hi)),
                         _mm512_castpd_ps(_mm512_unpackhi_pd(lo, hi)));
  }
  for (int i = 0; i < 2; ++i) {       // d[i]: 128-bit lanes pairwise added
    d[i] = _mm512_add_ps(_mm512_shuffle_f32x4(c[2 * i], c[2 * i + 1], 0x88),
                         _mm512_shuffle_f32x4(c[2 * i], c[2 * i + 1], 0xDD));
  }
  return _mm512_add_ps(_mm512_shuffle_f32x4(d[0], d[1], 0x88),
                       _mm512_shuffle_f32x4(d[0], d[1], 0xDD));
}

// logits[i, s + j] for rows i < 4 and keys j < 4 (H a multiple of 16): 16 accumulators, the four
// keys loaded once per 16 lanes for all four rows, summed by one tree.
inline void LogitsTile4x4(const float* q, const float* k, float* out, int64_t H, int64_t S) {
  __m512 acc[16];
  for (int j = 0; j < 16; ++j) acc[j] = _mm512_setzero_ps();
  for (int64_t h = 0; h < H; h += 16) {
    __m512 kv[4];
    for (int j = 0; j < 4; ++j) kv[j] = _mm512_loadu_ps(k + j * H + h);
    for (int i = 0; i < 4; ++i) {
      const __m512 qv = _mm512_loadu_ps(q + i * H + h);
      for (int j = 0; j < 4; ++j) acc[4 * i + j] = _mm512_fmadd_ps(qv, kv[j], acc[4 * i + j]);
    }
  }
  const __m512 sums = Sum16x16(acc);   // lanes 4i .. 4i+3: row i
  _mm_storeu_ps(out, _mm512_castps512_ps128(sums));
  _mm_storeu_ps(out + S, _mm512_extractf32x4_ps(sums, 1));
  _mm_storeu_ps(out + 2 * S, _mm512_extractf32x4_ps(sums, 2));
  _mm_storeu_ps(out + 3 * S, _mm512_extractf32x4_ps(sums, 3));
}

// context[i, 0 : 16*HB] (+)= sum_{s0 <= s < s1} w[i, s] * v[s, 0 : 16*HB] for rows i < RB:
// RB*HB accumulators, each value vector loaded once for all RB rows. `accumulate` continues the
// sums of an earlier key block; `prefetch` asks for the value row 16 keys ahead.
template <int RB, int HB>
inline void ContextTile512(const float* w, const float* v, float* out, int64_t s0, int64_t s1,
                           int64_t S, int64_t H, bool accumulate, bool prefetch) {
  __m512 acc[RB][HB];
  for (int i = 0; i < RB; ++i) {
    for (int j = 0; j < HB; ++j) {
      acc[i][j] = accumulate ? _mm512_loadu_ps(out + i * H + 16 * j) : _mm512_setzero_ps();
    }
  }
  for (int64_t s = s0; s < s1; ++s) {
    if (prefetch && s + 16 < S) _mm_prefetch(reinterpret_cast<const char*>(v + (s + 16) * H), _MM_HINT_T0);
    __m512 vv[HB];
    for (int j = 0; j < HB; ++j) vv[j] = _mm512_loadu_ps(v + s * H + 16 * j);
    for (int i = 0; i < RB; ++i) {
      const __m512 a = _mm512_set1_ps(w[i * S + s]);
      for (int j = 0; j < HB; ++j) acc[i][j] = _mm512_fmadd_ps(a, vv[j], acc[i][j]);
    }
  }
  for (int i = 0; i < RB; ++i) {
    for (int j = 0; j < HB; ++j) _mm512_storeu_ps(out + i * H + 16 * j, acc[i][j]);
  }
}

// Columns [0, 16*HB) of every row's context, keys in blocks of 128 (the block's values stay in
// L1 while every block of four rows reads them, so each value is read from memory once however
// many rows share it; with all rows' accumulators in registers at once, eight rows needed half
// rows per work item and ran at 9 GB/s, against 19 this way).
template <int HB>
void ContextRows512(const float* w, const float* v, float* out, int64_t R, int64_t S, int64_t H) {
  constexpr int64_t kKeys = 128;
  for (int64_t s0 = 0; s0 < S; s0 += kKeys) {
    const int64_t s1 = std::min(S, s0 + kKeys);
    const bool acc = s0 > 0;
    int64_t r = 0;
    for (; r + 4 <= R; r += 4) {
      ContextTile512<4, HB>(w + r * S, v, out + r * H, s0, s1, S, H, acc, r == 0);
    }
    for (; r + 2 <= R; r += 2) {
      ContextTile512<2, HB>(w + r * S, v, out + r * H, s0, s1, S, H, acc, r == 0);
    }
    for (; r < R; ++r) ContextTile512<1, HB>(w + r * S, v, out + r * H, s0, s1, S, H, acc, r == 0);
  }
}
#endif  // __AVX512F__

// y[:, n0 : n1] = x[:, d0 : d1] @ w[d0 : d1, n0 : n1]: one column block of a RowsMatmul thread's
// rows (the block of y, M x (n1 - n0) floats, stays in L1/L2). The weight is read a few rows at a
// time along their contiguous columns: sequential streams, which this kind of CPU prefetches;
// walking a register tile down the rows instead (N floats apart) ran at a third of the
// bandwidth. With AVX-512, eight rows of 16 columns at a time (the fastest of the variants
// measured for issue 23: 1.7x the AVX2 form at batch 8); else four rows of 8 columns.
void MatmulBlock(const float* x, const float* w, float* y, int64_t M, int64_t D, int64_t N,
                 int64_t d0, int64_t d1, int64_t n0, int64_t n1) {
  for (int64_t m = 0; m < M; ++m) std::fill(y + m * N + n0, y + m * N + n1, 0.0f);
  int64_t d = d0;
  int64_t vector_end = n0;
#if defined(__AVX512F__)
  vector_end = n0 + (n1 - n0) / 16 * 16;
  for (; d + 8 <= d1; d += 8) {
    const bool prefetch = d + 16 <= d1;
    int64_t m = 0;
    for (; m + 4 <= M; m += 4) {
      MatmulOctet512<4>(x, w, y, m, d, n0, vector_end, D, N, prefetch && m == 0);
    }
    for (; m < M; ++m) MatmulOctet512<1>(x, w, y, m, d, n0, vector_end, D, N, prefetch && m == 0);
  }
#elif defined(GQA_T5_AVX2)
  vector_end = n0 + (n1 - n0) / 8 * 8;
  for (; d + 4 <= d1; d += 4) {
    int64_t m = 0;
    for (; m + 2 <= M; m += 2) MatmulQuad<2>(x, w, y, m, d, n0, vector_end, D, N);
    for (; m < M; ++m) MatmulQuad<1>(x, w, y, m, d, n0, vector_end, D, N);
  }
#endif
  // What the vector loops left: columns past the last full vector for the rows they covered,
  // then every column of the remaining rows.
  for (int64_t m = 0; m < M; ++m) {
    for (int64_t j = vector_end; j < n1; ++j) {
      float acc = y[m * N + j];
      for (int64_t e = d0; e < d; ++e) acc += x[m * D + e] * w[e * N + j];
      y[m * N + j] = acc;
    }
  }
  for (; d < d1; ++d) {
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

// Logits of all R rows of one key/value head for keys [s0, s1): each group of four keys is read
// from memory once and stays in L1 while every row's tile uses it.
void LogitsKeys(const float* q, const float* k, float* out, int64_t R, int64_t S, int64_t H,
                int64_t s0, int64_t s1) {
  int64_t s = s0;
#if defined(__AVX512F__)
  if (H % 16 == 0) {
    for (; s + 4 <= s1; s += 4) {
      // A nudge to the hardware prefetcher, which this compute-heavy loop otherwise outruns.
      if (s + 16 < S) {
        for (int64_t b = 0; b < H * 4; b += 64) {
          _mm_prefetch(reinterpret_cast<const char*>(k + (s + 16) * H) + b, _MM_HINT_T0);
        }
      }
      int64_t r = 0;
      for (; r + 4 <= R; r += 4) LogitsTile4x4(q + r * H, k + s * H, out + r * S + s, H, S);
      for (; r < R; ++r) LogitsRow512(q + r * H, k + s * H, out + r * S + s, H);
    }
  }
#endif
#ifdef GQA_T5_AVX2
  for (; s + 4 <= s1; s += 4) {
    int64_t r = 0;
    for (; r + 2 <= R; r += 2) LogitsTile2x4(q + r * H, k + s * H, out + r * S + s, H, S);
    if (r < R) LogitsTile1x4(q + r * H, k + s * H, out + r * S + s, H);
  }
#endif
  for (; s < s1; ++s) {
    for (int64_t r = 0; r < R; ++r) out[r * S + s] = Dot(q + r * H, k + s * H, H);
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

#if defined(__AVX512F__)
// exp(x) for 16 lanes of x <= 0, to about 2 ulp: x = n*ln2 + r (ln2 split in two so n*ln2 is
// exact), e^r by its degree-6 Taylor polynomial on |r| <= ln2/2, times 2^n by scalef. x is first
// raised to -110, where e^x is already 0 in float32, so a masked key's huge negative logit
// cannot turn the reduction into garbage.
inline __m512 Exp16(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-110.0f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.0f / 720);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 120));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 24));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 6));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  return _mm512_scalef_ps(p, n);
}
#endif  // __AVX512F__

// x[s], or where kMasked and mask[s] is not > 0 the lowest float: the attention core's select.
template <bool kMasked>
inline float Selected(const float* x, const float* mask, int64_t s) {
  return !kMasked || mask[s] > 0.0f ? x[s] : std::numeric_limits<float>::lowest();
}

#if defined(__AVX512F__)
template <bool kMasked>
inline __m512 Selected16(const float* x, const float* mask, int64_t s) {
  const __m512 v = _mm512_loadu_ps(x + s);
  if (!kMasked) return v;
  const __mmask16 keep = _mm512_cmp_ps_mask(_mm512_loadu_ps(mask + s), _mm512_setzero_ps(),
                                            _CMP_GT_OQ);
  return _mm512_mask_blend_ps(keep, _mm512_set1_ps(std::numeric_limits<float>::lowest()), v);
}
#endif  // __AVX512F__

// y = softmax(x) of one row of S floats: the max, exp(x - max) with its sum, then 1/sum times
// each, the row staying in L1 between the passes. With kMasked each x is first `Selected` by
// its mask, in the same passes: the same values reach the same operations as a select before.
template <bool kMasked>
void SoftmaxRow(const float* x, const float* mask, float* y, int64_t S) {
  int64_t s = 0;
  float max = -std::numeric_limits<float>::infinity();
#if defined(__AVX512F__)
  __m512 vmax = _mm512_set1_ps(max);
  for (; s + 16 <= S; s += 16) vmax = _mm512_max_ps(vmax, Selected16<kMasked>(x, mask, s));
  max = _mm512_reduce_max_ps(vmax);
#endif
  for (; s < S; ++s) max = std::max(max, Selected<kMasked>(x, mask, s));
  s = 0;
  float sum = 0.0f;
#if defined(__AVX512F__)
  const __m512 shift = _mm512_set1_ps(max);
  __m512 vsum = _mm512_setzero_ps();
  for (; s + 16 <= S; s += 16) {
    const __m512 e = Exp16(_mm512_sub_ps(Selected16<kMasked>(x, mask, s), shift));
    _mm512_storeu_ps(y + s, e);
    vsum = _mm512_add_ps(vsum, e);
  }
  sum = _mm512_reduce_add_ps(vsum);
#endif
  for (; s < S; ++s) {
    y[s] = std::exp(Selected<kMasked>(x, mask, s) - max);
    sum += y[s];
  }
  const float scale = 1.0f / sum;
  for (s = 0; s < S; ++s) y[s] *= scale;
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
  // Items: (head, block of keys): every key read from memory once, by one thread. Blocks of 512
  // keys (long sequential runs: 64-key blocks ran at 15 against 18 GB/s for eight rows), smaller
  // while that leaves fewer than four items per thread.
  const int64_t threads = std::max<int64_t>(1, pool.num_threads());
  int64_t keys_per_item = 512;
  while (keys_per_item > 64 && P * ((S + keys_per_item - 1) / keys_per_item) < 4 * threads) {
    keys_per_item /= 2;
  }
  const int64_t blocks = (S + keys_per_item - 1) / keys_per_item;
  ParallelRanges(pool, P * blocks, [&](int64_t item) {
    const int64_t p = item / blocks, s0 = (item % blocks) * keys_per_item;
    LogitsKeys(q + p * R * H, k + p * S * H, out + p * R * S, R, S, H, s0,
               std::min(S, s0 + keys_per_item));
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
#if defined(__AVX512F__)
  // Items: (head, 16*HB columns of the head dim) with every row: each value read from memory
  // once, by one thread. The whole head (up to 64 columns) per item, narrower chunks only while
  // that leaves fewer than two items per thread.
  int hb = H % 64 == 0 ? 4 : H % 32 == 0 ? 2 : H % 16 == 0 ? 1 : 0;
  const int64_t threads = std::max<int64_t>(1, pool.num_threads());
  while (hb > 1 && P * (H / (16 * hb)) < 2 * threads) hb /= 2;
  if (hb > 0) {
    const int64_t chunks = H / (16 * hb);
    ParallelRanges(pool, P * chunks, [&](int64_t item) {
      const int64_t p = item / chunks, h0 = (item % chunks) * 16 * hb;
      const float* wp = w + p * R * S;
      const float* vp = v + p * S * H + h0;
      float* op = out + p * R * H + h0;
      if (hb == 4) ContextRows512<4>(wp, vp, op, R, S, H);
      if (hb == 2) ContextRows512<2>(wp, vp, op, R, S, H);
      if (hb == 1) ContextRows512<1>(wp, vp, op, R, S, H);
    });
    return ffi::Error::Success();
  }
#endif
  ParallelFor(pool, P * R, [&](int64_t item) {  // items: (head, row)
    const int64_t p = item / R, r = item % R;
    ContextRowAll(w + (p * R + r) * S, v + p * S * H, out + (p * R + r) * H, S, H);
  });
  return ffi::Error::Success();
}

ffi::Error SoftmaxImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                       ffi::ResultBuffer<ffi::F32> y) {
  const auto xd = x.dimensions();
  if (xd.size() < 1 || xd[xd.size() - 1] < 1) {
    return ffi::Error::InvalidArgument("Softmax: x [..., S] with S >= 1 expected");
  }
  const int64_t S = xd[xd.size() - 1];
  int64_t rows = 1;
  for (size_t i = 0; i + 1 < xd.size(); ++i) rows *= xd[i];
  const float* xp = x.typed_data();
  float* yp = y->typed_data();
  // Items: blocks of rows, about 64 KiB each, so a short row is not a task of its own.
  const int64_t per_item = std::max<int64_t>(1, 16384 / S);
  ParallelFor(pool, (rows + per_item - 1) / per_item, [&](int64_t item) {
    const int64_t r1 = std::min(rows, (item + 1) * per_item);
    for (int64_t r = item * per_item; r < r1; ++r) {
      SoftmaxRow<false>(xp + r * S, nullptr, yp + r * S, S);
    }
  });
  return ffi::Error::Success();
}

// Softmax of the rows of x [B, K, G, T, S] whose keys mask [Bm, 1, T, S] (Bm = 1 or B) allows
// (mask > 0), a masked key counting as the lowest float: the attention core's select and then
// the softmax above, in the softmax's passes over each row (bit for bit the two apart).
ffi::Error MaskedSoftmaxImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                             ffi::Buffer<ffi::F32> mask, ffi::ResultBuffer<ffi::F32> y) {
  const auto xd = x.dimensions();
  const auto md = mask.dimensions();
  if (xd.size() != 5 || md.size() != 4 || md[1] != 1 || md[2] != xd[3] || md[3] != xd[4] ||
      (md[0] != 1 && md[0] != xd[0]) || xd[4] < 1) {
    return ffi::Error::InvalidArgument(
        "MaskedSoftmax: x [B, K, G, T, S] and mask [1 or B, 1, T, S] expected");
  }
  const int64_t T = xd[3], S = xd[4];
  const int64_t rows = xd[0] * xd[1] * xd[2] * T;
  const int64_t rows_per_batch = xd[1] * xd[2] * T;
  const bool batched_mask = md[0] != 1;
  const float* xp = x.typed_data();
  const float* mp = mask.typed_data();
  float* yp = y->typed_data();
  const int64_t per_item = std::max<int64_t>(1, 16384 / S);  // as Softmax's items
  ParallelFor(pool, (rows + per_item - 1) / per_item, [&](int64_t item) {
    const int64_t r1 = std::min(rows, (item + 1) * per_item);
    for (int64_t r = item * per_item; r < r1; ++r) {
      const float* m = mp + ((batched_mask ? r / rows_per_batch : 0) * T + r % T) * S;
      SoftmaxRow<true>(xp + r * S, m, yp + r * S, S);
    }
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
  // Items: one contiguous range of weight rows per thread, walked in blocks of 256 columns, each
  // range leaving a partial y that the calling thread adds up (issue 23). Splitting the columns
  // instead left every thread half of each row, 1-2 KiB runs, at 12-18 GB/s. Blocks of 256
  // columns keep a block's eight weight rows and its y (8 x 1 KiB each at 8 rows) in L1 between
  // the row blocks of x: the 62.8 MiB logits weight streamed at 24-27 GB/s this way, against
  // 18-19 GB/s in blocks of 4,096 columns (L2) and 13-24 GB/s with (range, block) items claimed
  // by either thread, which put both threads on the same rows. Ranges are whole multiples of
  // eight rows.
  // A weight of at most 256 KiB (a GQA step's key/value projections) is read on the calling
  // thread alone: split between two threads it took as long (16-17 us a call either way).
  constexpr int64_t kSmallWeight = 65536;
  const int64_t threads = D * N <= kSmallWeight ? 1 : std::max<int64_t>(1, pool.num_threads());
  const int64_t parts = std::max<int64_t>(1, std::min<int64_t>(threads, D / 64));
  const int64_t rows_per_part = (D / parts + 7) / 8 * 8;
  constexpr int64_t kBlock = 256;
  // Partial sums of ranges 1.. (range 0 writes y itself), reused across calls on this thread.
  thread_local std::vector<float> scratch;
  // Grown only: a resize to a larger size zero-fills the new floats (1 MiB at the logits' N).
  const size_t needed = static_cast<size_t>((parts - 1) * M * N);
  if (scratch.size() < needed) scratch.resize(needed);
  float* partial = scratch.data();
  const auto body = [&](int64_t part) {
    const int64_t d0 = std::min(D, part * rows_per_part);
    const int64_t d1 = part + 1 == parts ? D : std::min(D, d0 + rows_per_part);
    float* out = part == 0 ? yp : partial + (part - 1) * M * N;
    for (int64_t n0 = 0; n0 < N; n0 += kBlock) {
      MatmulBlock(xp, wp, out, M, D, N, d0, d1, n0, std::min(N, n0 + kBlock));
    }
  };
  if (threads == 1) {
    for (int64_t part = 0; part < parts; ++part) body(part);
  } else {
    ParallelFor(pool, parts, body);
  }
  for (int64_t part = 1; part < parts; ++part) {
    const float* add = partial + (part - 1) * M * N;
    for (int64_t i = 0; i < M * N; ++i) yp[i] += add[i];
  }
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
XLA_FFI_DEFINE_HANDLER_SYMBOL(GqaT5Softmax, SoftmaxImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(GqaT5MaskedSoftmax, MaskedSoftmaxImpl, GQA_T5_PRODUCT_BINDING);

XLA_FFI_DEFINE_HANDLER_SYMBOL(GqaT5ThreadCount, ThreadCountImpl,
                              ffi::Ffi::Bind().Ctx<ffi::ThreadPool>().Ret<ffi::Buffer<ffi::S32>>());
