// Sparse matrix-vector products over selected rows, as XLA FFI custom calls for the CPU.
//
//   AfGatherMatvec: y[o] = sum_j xk[j] * W[rows[j], o]   (W row-major [in, out]; rows ascending)
//   AfTopkMatvec:   the same over the active channels of x, selected here (see TopkMatvecImpl)
//   AfRowsDot:      y[v] = sum_d E[v, d] * x[d]   (the tied head: E is the embedding [V, d])
//   AfRmsNormOne:   one token's RMSNorm
//   AfAttendOne:    one decoded token's RoPE, KV-cache write and attention (llama.attend, T = 1)
//   AfQGatherMatvec, AfQTopkMatvec, AfQMatvec (dense), AfQRowsDot: the products above on quantized
//                   rows (q8 / q4 blocks, activeflow_jax/quant.py), widened block by block in registers
//   AfPoolSelect:   AfTopkMatvec's selection for rows held in a slot pool: channels, values, slots
//
// XLA:CPU can only do this as a gather (a copy of the k rows into a temporary, ~5 GB/s) followed
// by a dot, which costs more than the dense product it replaces. Here each selected row is
// streamed once, straight from W, as an axpy into the output.
#include <algorithm>
#include <atomic>
#include <functional>
#include <memory>
#include <cmath>
#include <cstdlib>
#include <cstdint>
#include <cstring>
#include <thread>
#include <vector>
#ifdef __AVX2__
#include <immintrin.h>
#endif

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int kMaxParts = 8;

// y[col0:col1] = sum_j xk[j] * W[rows[j], col0:col1]. Eight rows per pass: eight independent
// memory streams keep enough cache-line fills in flight for scattered rows, and y (in L1) is
// loaded and stored an eighth as often. The next block's rows are touched ahead of time so that
// their TLB walks and first line fills overlap this block's work.
void AxpyRows(const float* __restrict__ xk, const int32_t* __restrict__ rows, int64_t k,
              const float* __restrict__ w, int64_t out, int64_t col0, int64_t col1, float* __restrict__ y) {
  constexpr int B = 8;
  float* __restrict__ yc = y + col0;
  const int64_t n = col1 - col0;
  std::fill(yc, yc + n, 0.0f);
  auto row = [&](int64_t j) { return w + static_cast<int64_t>(rows[j]) * out + col0; };
  int64_t j = 0;
  for (; j + B <= k; j += B) {
    for (int64_t p = j + B; p < std::min(k, j + 2 * B); ++p) {
      const float* r = row(p);
      for (int64_t o = 0; o < n; o += 1024) __builtin_prefetch(r + o);  // one touch per 4 KiB page
    }
    const float a0 = xk[j], a1 = xk[j + 1], a2 = xk[j + 2], a3 = xk[j + 3];
    const float a4 = xk[j + 4], a5 = xk[j + 5], a6 = xk[j + 6], a7 = xk[j + 7];
    const float *__restrict__ r0 = row(j), *__restrict__ r1 = row(j + 1), *__restrict__ r2 = row(j + 2),
                *__restrict__ r3 = row(j + 3), *__restrict__ r4 = row(j + 4), *__restrict__ r5 = row(j + 5),
                *__restrict__ r6 = row(j + 6), *__restrict__ r7 = row(j + 7);
    for (int64_t o = 0; o < n; ++o)
      yc[o] += (a0 * r0[o] + a1 * r1[o]) + (a2 * r2[o] + a3 * r3[o]) + (a4 * r4[o] + a5 * r5[o]) +
               (a6 * r6[o] + a7 * r7[o]);
  }
  for (; j < k; ++j) {
    const float a = xk[j];
    const float* __restrict__ r = row(j);
    for (int64_t o = 0; o < n; ++o) yc[o] += a * r[o];
  }
}

// Runs fn(0..parts-1): part 0 on the calling thread, the others offered to XLA's own intra-op
// thread pool (its threads are awake while the step runs; a private pool had to wait for a
// core). A part no pool thread has started by the time the caller is done with its own is run by
// the caller, so a descheduled pool thread (another process on the core) never stalls the step.
struct ParallelState {
  std::atomic<bool> claimed[kMaxParts];
  std::atomic<int> finished{0};
  const std::function<void(int)>* fn = nullptr;
};

void ParallelFor(ffi::ThreadPool& pool, int parts, const std::function<void(int)>& fn) {
  auto state = std::make_shared<ParallelState>();
  for (int t = 0; t < parts; ++t) state->claimed[t].store(false, std::memory_order_relaxed);
  state->fn = &fn;
  for (int t = 1; t < parts; ++t) {
    pool.Schedule([state, t] {
      if (state->claimed[t].exchange(true, std::memory_order_acq_rel)) return;  // the caller took it
      (*state->fn)(t);
      state->finished.fetch_add(1, std::memory_order_release);
    });
  }
  fn(0);
  for (int t = 1; t < parts; ++t) {
    if (!state->claimed[t].exchange(true, std::memory_order_acq_rel)) {
      fn(t);
      state->finished.fetch_add(1, std::memory_order_release);
    }
  }
  for (int spins = 0; state->finished.load(std::memory_order_acquire) < parts - 1; ++spins) {
    if (spins > 4096) std::this_thread::yield();
  }
}

int Parts(ffi::ThreadPool& pool, int64_t bytes) {
  static const int cap = [] {
    const char* env = std::getenv("ACTIVEFLOW_NATIVE_THREADS");
    const int n = env ? std::atoi(env) : 0;
    return n >= 1 ? std::min(n, kMaxParts) : kMaxParts;
  }();
  // below ~128 KiB of rows a second thread costs more than it saves
  if (bytes < (128 << 10)) return 1;
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(cap, pool.num_threads())));
}

// Rows are split between parts (each streams whole rows: long contiguous reads), each into its
// own partial output; the partials are summed at the end (out floats per part: cheap).
void SparseMatvec(ffi::ThreadPool& pool, const float* xk, const int32_t* rows, int64_t n, const float* w,
                  int64_t out, float* y) {
  const int parts = Parts(pool, n * out * 4);
  if (parts == 1) {
    AxpyRows(xk, rows, n, w, out, 0, out, y);
    return;
  }
  thread_local std::vector<float> partial;
  partial.assign(static_cast<size_t>(parts - 1) * out, 0.0f);
  float* extra = partial.data();
  ParallelFor(pool, parts, [&](int t) {
    const int64_t r0 = n * t / parts, r1 = n * (t + 1) / parts;
    AxpyRows(xk + r0, rows + r0, r1 - r0, w, out, 0, out, t == 0 ? y : extra + (t - 1) * out);
  });
  for (int t = 1; t < parts; ++t) {
    const float* p = extra + (t - 1) * out;
    for (int64_t o = 0; o < out; ++o) y[o] += p[o];
  }
}

// y[v] = dot(E[v, :], x) for v in [v0, v1). Four rows per pass share each load of x; sixteen
// independent lanes per row let the compiler vectorize the reduction without reassociating it.
// XLA:CPU runs the tied head ([1, d] x [V, d]^T) well below the DRAM bandwidth, and the head is
// ~21% of the bytes a decode step reads on SmolLM2.
void RowsDot(const float* __restrict__ e, const float* __restrict__ x, int64_t d, int64_t v0, int64_t v1,
             float* __restrict__ y) {
  constexpr int L = 16;
  auto finish = [&](const float* acc, const float* r) {
    float s = 0.0f;
    for (int l = 0; l < L; ++l) s += acc[l];
    for (int64_t o = d - d % L; o < d; ++o) s += r[o] * x[o];
    return s;
  };
  int64_t v = v0;
  for (; v + 4 <= v1; v += 4) {
    const float *__restrict__ r0 = e + v * d, *__restrict__ r1 = r0 + d, *__restrict__ r2 = r1 + d,
                *__restrict__ r3 = r2 + d;
    float a0[L] = {}, a1[L] = {}, a2[L] = {}, a3[L] = {};
    for (int64_t o = 0; o + L <= d; o += L) {
      for (int l = 0; l < L; ++l) {
        const float xv = x[o + l];
        a0[l] += r0[o + l] * xv;
        a1[l] += r1[o + l] * xv;
        a2[l] += r2[o + l] * xv;
        a3[l] += r3[o + l] * xv;
      }
    }
    y[v] = finish(a0, r0);
    y[v + 1] = finish(a1, r1);
    y[v + 2] = finish(a2, r2);
    y[v + 3] = finish(a3, r3);
  }
  for (; v < v1; ++v) {
    const float* __restrict__ r = e + v * d;
    float a[L] = {};
    for (int64_t o = 0; o + L <= d; o += L)
      for (int l = 0; l < L; ++l) a[l] += r[o + l] * x[o + l];
    y[v] = finish(a, r);
  }
}

ffi::Error RowsDotImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> e,
                       ffi::ResultBuffer<ffi::F32> y) {
  auto ed = e.dimensions();
  if (ed.size() != 2) return ffi::Error::InvalidArgument("e must be 2-D [V, d]");
  const int64_t v = ed[0], d = ed[1];
  if (x.element_count() != d) return ffi::Error::InvalidArgument("x must have d elements");
  if (y->element_count() != v) return ffi::Error::InvalidArgument("y must have V elements");
  const int parts = Parts(pool, v * d * 4);
  const float *ep = e.typed_data(), *xp = x.typed_data();
  float* yp = y->typed_data();
  ParallelFor(pool, parts, [&](int t) {
    // part boundaries on multiples of 4 rows, so every row is summed the same way whatever the split
    const int64_t b0 = (v / 4) * t / parts * 4, b1 = t == parts - 1 ? v : (v / 4) * (t + 1) / parts * 4;
    RowsDot(ep, xp, d, b0, b1, yp);
  });
  return ffi::Error::Success();
}

// Shapes shared by both products: w [in, out], y [out elements]. Returns false (with `error` set) if not.
bool CheckProduct(const ffi::Buffer<ffi::F32>& w, int64_t y_count, int64_t* in, int64_t* out, ffi::Error* error) {
  auto wd = w.dimensions();
  if (wd.size() != 2) {
    *error = ffi::Error::InvalidArgument("w must be 2-D [in, out]");
    return false;
  }
  *in = wd[0];
  *out = wd[1];
  if (y_count != *out) {
    *error = ffi::Error::InvalidArgument("y must have `out` elements");
    return false;
  }
  return true;
}

// rows/xk may be padded: only the first `count` entries are used, so that a product over the same
// active rows has the same length -- and so the same split and summation order -- as AfTopkMatvec.
ffi::Error GatherMatvecImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> xk, ffi::Buffer<ffi::S32> rows,
                            ffi::Buffer<ffi::F32> w, ffi::Buffer<ffi::S32> count, ffi::ResultBuffer<ffi::F32> y) {
  int64_t in, out;
  ffi::Error error = ffi::Error::Success();
  if (!CheckProduct(w, y->element_count(), &in, &out, &error)) return error;
  const int64_t k = rows.element_count();
  if (xk.element_count() != k) return ffi::Error::InvalidArgument("xk and rows differ in length");
  if (count.element_count() != 1) return ffi::Error::InvalidArgument("count must have one element");
  const int64_t n = std::max<int64_t>(0, std::min<int64_t>(k, count.typed_data()[0]));
  const int32_t* r = rows.typed_data();
  for (int64_t j = 0; j < n; ++j) {
    if (r[j] < 0 || r[j] >= in) return ffi::Error::InvalidArgument("row index out of range");
  }
  SparseMatvec(pool, xk.typed_data(), r, n, w.typed_data(), out, y->typed_data());
  return ffi::Error::Success();
}

// The active channels of x [n]: |x| >= max(k-th largest |x|, threshold) (threshold only if
// use_threshold), at most k, lowest indices first among ties; appends their indices to rows (and
// values to xk, if given). The k-th largest is found by bisection on the bit patterns of |x|
// (non-negative floats order like their int32 bits), 31 vectorized compare-and-count passes:
// 0.7 / 1.5 us for 576 / 1536 channels, against 4.3 / 11.6 us for std::nth_element, which ran
// ~120 times per decoded token. The result is the same value, so the same channels.
void SelectActive(const float* __restrict__ x, int64_t n, int64_t k, float threshold, bool use_threshold,
                  std::vector<int32_t>& bits, std::vector<int32_t>* rows, std::vector<float>* xk) {
  bits.resize(n);
  int32_t* __restrict__ b = bits.data();
  int32_t hi = 0;
  for (int64_t i = 0; i < n; ++i) {
    int32_t v;
    std::memcpy(&v, x + i, 4);
    b[i] = v & 0x7fffffff;
    hi = std::max(hi, b[i]);
  }
  int32_t lo = 0;  // invariant: count(b >= lo) >= k
  while (lo < hi) {
    const int32_t mid = lo + (hi - lo + 1) / 2;
    int32_t count = 0;
    for (int64_t i = 0; i < n; ++i) count += b[i] >= mid;
    if (count >= k) lo = mid;
    else hi = mid - 1;
  }
  float cut;
  std::memcpy(&cut, &lo, 4);
  if (use_threshold) cut = std::max(cut, threshold);
  int32_t cut_bits;
  std::memcpy(&cut_bits, &cut, 4);
  rows->clear();
  if (xk) xk->clear();
  for (int64_t i = 0; i < n && static_cast<int64_t>(rows->size()) < k; ++i) {
    if (b[i] >= cut_bits) {
      rows->push_back(static_cast<int32_t>(i));
      if (xk) xk->push_back(x[i]);
    }
  }
}

// Selection + product in one call, for decode: the active rows of x are the channels with
// |x| >= max(k-th largest |x|, threshold) (threshold only if use_threshold), at most k of them,
// lowest indices first among ties -- the same rule as kernels.active_mask.
// `threshold` may be the model's whole [L, 4] table; entry `index` is this op's.
ffi::Error TopkMatvecImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> threshold,
                          ffi::Buffer<ffi::F32> w, ffi::ResultBuffer<ffi::F32> y, int64_t k, int64_t use_threshold,
                          int64_t index) {
  int64_t in, out;
  ffi::Error error = ffi::Error::Success();
  if (!CheckProduct(w, y->element_count(), &in, &out, &error)) return error;
  if (x.element_count() != in) return ffi::Error::InvalidArgument("x must have `in` elements");
  if (k < 1 || k > in) return ffi::Error::InvalidArgument("k must be in [1, in]");
  if (index < 0 || index >= threshold.element_count()) return ffi::Error::InvalidArgument("threshold index out of range");
  const float* xp = x.typed_data();
  // per-thread buffers: no heap allocation per call on the decode path
  thread_local std::vector<int32_t> bits, rows;
  thread_local std::vector<float> xk;
  SelectActive(xp, in, k, threshold.typed_data()[index], use_threshold, bits, &rows, &xk);
  SparseMatvec(pool, xk.data(), rows.data(), static_cast<int64_t>(rows.size()), w.typed_data(), out,
               y->typed_data());
  return ffi::Error::Success();
}

// The active-channel rule alone, per row of x [T, in]: mask 1.0 where |x| >= max(k-th largest |x|,
// threshold), at most k per row, lowest indices first among ties (kernels.active_mask). XLA's
// version bisects on the bit pattern in 31 loop passes, which costs ~0.1 ms of loop overhead per
// call on the CPU; the swapping runtime selects ~120 times per token.
ffi::Error ActiveMaskImpl(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> threshold, ffi::ResultBuffer<ffi::F32> mask,
                          int64_t k, int64_t use_threshold) {
  auto xd = x.dimensions();
  if (xd.size() != 2) return ffi::Error::InvalidArgument("x must be 2-D [T, in]");
  const int64_t t = xd[0], in = xd[1];
  if (k < 1 || k > in) return ffi::Error::InvalidArgument("k must be in [1, in]");
  thread_local std::vector<int32_t> bits, rows;
  for (int64_t r = 0; r < t; ++r) {
    const float* xp = x.typed_data() + r * in;
    float* mp = mask->typed_data() + r * in;
    SelectActive(xp, in, k, threshold.typed_data()[0], use_threshold, bits, &rows, nullptr);
    std::fill(mp, mp + in, 0.0f);
    for (int32_t i : rows) mp[i] = 1.0f;
  }
  return ffi::Error::Success();
}


// One decoded token's attention between the qkv and o projections (llama.attend for T = 1):
// rotate-half RoPE of q and k at position `pos`, k/v written into the caches at `pos`, softmax
// attention of every query head over cache positions [0, pos] of its KV head. XLA:CPU runs this as
// ~13 small programs per layer (two cache updates, RoPE, two batched dots, softmax passes), whose
// fixed cost per program is a large share of a sparse decode step; here it is one call.
// The caches are updated in place: the outputs alias the cache operands.
// dot(a, b) over n floats in sixteen independent lanes: the compiler vectorizes it without
// reassociating, and the order of the sum is fixed whatever the caller.
float LaneDot(const float* __restrict__ a, const float* __restrict__ b, int64_t n) {
  constexpr int L = 16;
  float lanes[L] = {};
  int64_t i = 0;
  for (; i + L <= n; i += L)
    for (int l = 0; l < L; ++l) lanes[l] += a[i + l] * b[i + l];
  float acc = 0.0f;
  for (int l = 0; l < L; ++l) acc += lanes[l];
  for (; i < n; ++i) acc += a[i] * b[i];
  return acc;
}

void AttendHead(const float* q, const float* kc, const float* vc, int64_t pos, int64_t hd, int64_t group,
                float* out, float* scores) {
  const float scale = 1.0f / std::sqrt(static_cast<float>(hd));
  for (int64_t g = 0; g < group; ++g) {
    const float* qg = q + g * hd;
    float m = -INFINITY;
    for (int64_t s = 0; s <= pos; ++s) {
      scores[s] = LaneDot(qg, kc + s * hd, hd) * scale;
      m = std::max(m, scores[s]);
    }
    float sum = 0.0f;
    for (int64_t s = 0; s <= pos; ++s) {
      scores[s] = std::exp(scores[s] - m);
      sum += scores[s];
    }
    const float inv = 1.0f / sum;
    float* o = out + g * hd;
    std::fill(o, o + hd, 0.0f);
    for (int64_t s = 0; s <= pos; ++s) {
      const float p = scores[s] * inv;
      const float* vr = vc + s * hd;
      for (int64_t i = 0; i < hd; ++i) o[i] += p * vr[i];
    }
  }
}

void Rope(const float* x, float* y, int64_t hd, const float* cosv, const float* sinv) {
  const int64_t half = hd / 2;
  for (int64_t i = 0; i < half; ++i) {
    const float x1 = x[i], x2 = x[i + half];
    y[i] = x1 * cosv[i] - x2 * sinv[i];
    y[i + half] = x2 * cosv[i] + x1 * sinv[i];
  }
}

ffi::Error AttendOneImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> qkv, ffi::Buffer<ffi::F32> k_in,
                         ffi::Buffer<ffi::F32> v_in, ffi::Buffer<ffi::S32> pos_buf, ffi::ResultBuffer<ffi::F32> out,
                         ffi::ResultBuffer<ffi::F32> k_out, ffi::ResultBuffer<ffi::F32> v_out, int64_t heads,
                         int64_t kv_heads, int64_t head_dim, int64_t attn_len, float theta) {
  auto kd = k_in.dimensions();
  if (kd.size() != 3 || kd[0] != kv_heads || kd[2] != head_dim)
    return ffi::Error::InvalidArgument("caches must be [kv_heads, max_len, head_dim]");
  const int64_t max_len = kd[1];
  if (v_in.element_count() != k_in.element_count()) return ffi::Error::InvalidArgument("k and v caches differ");
  if (heads < 1 || kv_heads < 1 || heads % kv_heads || head_dim % 2)
    return ffi::Error::InvalidArgument("bad head counts");
  const int64_t q_dim = heads * head_dim, kv_dim = kv_heads * head_dim;
  if (qkv.element_count() != q_dim + 2 * kv_dim) return ffi::Error::InvalidArgument("qkv must be [q + 2 kv]");
  if (out->element_count() != q_dim) return ffi::Error::InvalidArgument("out must be [q_dim]");
  if (attn_len < 1 || attn_len > max_len) return ffi::Error::InvalidArgument("attn_len outside the cache");
  if (pos_buf.element_count() != 1) return ffi::Error::InvalidArgument("pos must have one element");
  const int64_t pos = pos_buf.typed_data()[0];
  if (pos < 0 || pos >= attn_len) return ffi::Error::InvalidArgument("position outside the attended length");
  float* kc = k_out->typed_data();
  float* vc = v_out->typed_data();
  // the outputs alias the inputs when XLA honours the aliasing; otherwise start from a copy
  if (kc != k_in.typed_data()) std::copy(k_in.typed_data(), k_in.typed_data() + k_in.element_count(), kc);
  if (vc != v_in.typed_data()) std::copy(v_in.typed_data(), v_in.typed_data() + v_in.element_count(), vc);
  const int64_t half = head_dim / 2;
  thread_local std::vector<float> cosv, sinv, qr;
  cosv.resize(half);
  sinv.resize(half);
  qr.resize(q_dim);
  for (int64_t i = 0; i < half; ++i) {
    const float inv_freq = std::pow(theta, -static_cast<float>(i) / static_cast<float>(half));
    const float angle = static_cast<float>(pos) * inv_freq;
    cosv[i] = std::cos(angle);
    sinv[i] = std::sin(angle);
  }
  const float* x = qkv.typed_data();
  for (int64_t h = 0; h < heads; ++h) Rope(x + h * head_dim, qr.data() + h * head_dim, head_dim, cosv.data(), sinv.data());
  for (int64_t h = 0; h < kv_heads; ++h) {
    Rope(x + q_dim + h * head_dim, kc + (h * max_len + pos) * head_dim, head_dim, cosv.data(), sinv.data());
    std::copy(x + q_dim + kv_dim + h * head_dim, x + q_dim + kv_dim + (h + 1) * head_dim,
              vc + (h * max_len + pos) * head_dim);
  }
  const int64_t group = heads / kv_heads;
  // a KV head per part once the attended cache is large enough to be worth a second thread
  const int parts = static_cast<int>(std::min<int64_t>(kv_heads, Parts(pool, 2 * (pos + 1) * kv_dim * 4)));
  float* op = out->typed_data();
  // qr is thread_local: inside the lambda its name would mean the pool thread's own (empty) copy
  const float* q = qr.data();
  ParallelFor(pool, parts, [&](int t) {
    thread_local std::vector<float> scores;
    scores.resize(pos + 1);
    for (int64_t h = kv_heads * t / parts; h < kv_heads * (t + 1) / parts; ++h)
      AttendHead(q + h * group * head_dim, kc + h * max_len * head_dim, vc + h * max_len * head_dim, pos,
                 head_dim, group, op + h * group * head_dim, scores.data());
  });
  return ffi::Error::Success();
}


// RMSNorm of one token: h = x / sqrt(mean(x^2) + eps) * w. XLA:CPU runs it as four programs (square,
// reduction, rsqrt, scale); a decode step has two per layer.
ffi::Error RmsNormOneImpl(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w, ffi::ResultBuffer<ffi::F32> h, float eps) {
  const int64_t d = x.element_count();
  if (w.element_count() != d || h->element_count() != d) return ffi::Error::InvalidArgument("x, w, h differ in size");
  const float* xp = x.typed_data();
  const float* wp = w.typed_data();
  const float scale = 1.0f / std::sqrt(LaneDot(xp, xp, d) / static_cast<float>(d) + eps);
  float* hp = h->typed_data();
  for (int64_t j = 0; j < d; ++j) hp[j] = xp[j] * scale * wp[j];
  return ffi::Error::Success();
}

// ---------------------------------------------------------------------------------------------
// Quantized rows (activeflow_jax/quant.py): a row [in, out] of a weight is blocks of 32 values,
//   q8 (34 bytes): f16 scale d, 32 int8 codes                                value = d * q
//   q4 (20 bytes): f16 scale d, f16 minimum m, 16 bytes of nibbles
//                  (value l in the low nibble of byte l, value l + 16 in the high one)   value = d * q + m
// The kernels read rows where they lie and widen the codes in registers (int -> f32), with each
// block's scale folded into one multiplier per row and block; the results equal the f32 products on
// quant.dequantize's weights up to rounding. A row's last block may be padding past `cols`: never
// summed into the output.

constexpr int kQBlock = 32;

inline float HalfToFloat(uint16_t h) {
#ifdef __F16C__
  return _cvtsh_ss(h);
#else
  const uint32_t sign = (h & 0x8000u) << 16, exp = (h >> 10) & 0x1f, man = h & 0x3ff;
  uint32_t bits;
  if (exp == 0) {
    if (man == 0) {
      bits = sign;
    } else {  // subnormal: normalize
      int e = -1;
      uint32_t m = man;
      do {
        ++e;
        m <<= 1;
      } while ((m & 0x400) == 0);
      bits = sign | ((127 - 15 - e) << 23) | ((m & 0x3ff) << 13);
    }
  } else if (exp == 31) {
    bits = sign | 0x7f800000u | (man << 13);
  } else {
    bits = sign | ((exp + 112) << 23) | (man << 13);
  }
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
#endif
}

inline float LoadHalf(const uint8_t* p) {
  uint16_t h;
  std::memcpy(&h, p, 2);
  return HalfToFloat(h);
}

template <int Kind>
constexpr int64_t QBlockBytes() {
  return Kind == 8 ? 2 + kQBlock : 4 + kQBlock / 2;
}

// The 32 f32 values of one block.
template <int Kind>
inline void WidenBlock(const uint8_t* __restrict__ b, float* __restrict__ w) {
  const float d = LoadHalf(b);
  if constexpr (Kind == 8) {
    const int8_t* __restrict__ q = reinterpret_cast<const int8_t*>(b + 2);
    for (int l = 0; l < kQBlock; ++l) w[l] = d * static_cast<float>(q[l]);
  } else {
    const float m = LoadHalf(b + 2);
    const uint8_t* __restrict__ q = b + 4;
    for (int l = 0; l < kQBlock / 2; ++l) {
      w[l] = d * static_cast<float>(q[l] & 15) + m;
      w[l + kQBlock / 2] = d * static_cast<float>(q[l] >> 4) + m;
    }
  }
}

// y[0 : nb * 32] = sum_j xk[j] * widen(W[rows[j]]), y padded to whole blocks. Up to eight rows per
// pass, and within a block the scale is folded into the row's coefficient: xk[j] * (d q + m) =
// (xk[j] d) q + xk[j] m, so a value costs one widening (int -> f32) and one FMA, and the eight
// rows' minimum terms are added to the block once. (Widening each value to d * q first, as the
// f32 weight holds it, made the kernel compute-bound at 2-3x the f32 kernel's time; the sums now
// differ from AxpyRows on the widened weight by rounding only: within 1e-6 relative.)
template <int Kind>
void QAxpyRows(const float* __restrict__ xk, const int32_t* __restrict__ rows, int64_t k, const uint8_t* __restrict__ w,
               int64_t rb, int64_t nb, float* __restrict__ y) {
  constexpr int B = 8;
  constexpr int64_t BB = QBlockBytes<Kind>();
  std::fill(y, y + nb * kQBlock, 0.0f);
  auto row = [&](int64_t j) { return w + static_cast<int64_t>(rows[j]) * rb; };
  for (int64_t j = 0; j < k; j += B) {
    const int nr = static_cast<int>(std::min<int64_t>(B, k - j));
    for (int64_t p = j + B; p < std::min(k, j + 2 * B); ++p) {
      const uint8_t* r = row(p);
      for (int64_t o = 0; o < rb; o += 64) __builtin_prefetch(r + o);
    }
    const uint8_t* r[B];
    float a[B];
    for (int t = 0; t < nr; ++t) {
      r[t] = row(j + t);
      a[t] = xk[j + t];
    }
    for (int64_t blk = 0; blk < nb; ++blk) {
      float c[B];
      float am = 0.0f;  // sum of xk * m over the rows (q4)
      for (int t = 0; t < nr; ++t) {
        const uint8_t* b = r[t] + blk * BB;
        c[t] = a[t] * LoadHalf(b);
        if constexpr (Kind == 4) am += a[t] * LoadHalf(b + 2);
      }
      float* __restrict__ yb = y + blk * kQBlock;
#ifdef __AVX2__
      __m256 y0 = _mm256_loadu_ps(yb), y1 = _mm256_loadu_ps(yb + 8), y2 = _mm256_loadu_ps(yb + 16),
             y3 = _mm256_loadu_ps(yb + 24);
      for (int t = 0; t < nr; ++t) {
        const __m256 ct = _mm256_set1_ps(c[t]);
        const uint8_t* q = r[t] + blk * BB + (Kind == 8 ? 2 : 4);
        __m256 q0, q1, q2, q3;
        if constexpr (Kind == 8) {
          const __m128i lo = _mm_loadu_si128(reinterpret_cast<const __m128i*>(q));
          const __m128i hi = _mm_loadu_si128(reinterpret_cast<const __m128i*>(q + 16));
          q0 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(lo));
          q1 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(lo, 8)));
          q2 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(hi));
          q3 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(hi, 8)));
        } else {
          const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(q));
          const __m128i mask = _mm_set1_epi8(15);
          const __m128i lo = _mm_and_si128(bytes, mask), hi = _mm_and_si128(_mm_srli_epi16(bytes, 4), mask);
          q0 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(lo));
          q1 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(lo, 8)));
          q2 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(hi));
          q3 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(hi, 8)));
        }
        y0 = _mm256_fmadd_ps(ct, q0, y0);
        y1 = _mm256_fmadd_ps(ct, q1, y1);
        y2 = _mm256_fmadd_ps(ct, q2, y2);
        y3 = _mm256_fmadd_ps(ct, q3, y3);
      }
      if constexpr (Kind == 4) {
        const __m256 m = _mm256_set1_ps(am);
        y0 = _mm256_add_ps(y0, m);
        y1 = _mm256_add_ps(y1, m);
        y2 = _mm256_add_ps(y2, m);
        y3 = _mm256_add_ps(y3, m);
      }
      _mm256_storeu_ps(yb, y0);
      _mm256_storeu_ps(yb + 8, y1);
      _mm256_storeu_ps(yb + 16, y2);
      _mm256_storeu_ps(yb + 24, y3);
#else
      for (int t = 0; t < nr; ++t) {
        const float ct = c[t];
        const uint8_t* q = r[t] + blk * BB + (Kind == 8 ? 2 : 4);
        if constexpr (Kind == 8) {
          for (int l = 0; l < kQBlock; ++l) yb[l] += ct * static_cast<float>(static_cast<int8_t>(q[l]));
        } else {
          for (int l = 0; l < kQBlock / 2; ++l) {
            yb[l] += ct * static_cast<float>(q[l] & 15);
            yb[l + kQBlock / 2] += ct * static_cast<float>(q[l] >> 4);
          }
        }
      }
      if constexpr (Kind == 4)
        for (int l = 0; l < kQBlock; ++l) yb[l] += am;
#endif
    }
  }
}

// SparseMatvec on quantized rows: the same split into parts (by the f32 row bytes, so the same
// number of parts) and the same order of summing the partials.
template <int Kind>
void QSparseMatvecT(ffi::ThreadPool& pool, const float* xk, const int32_t* rows, int64_t n, const uint8_t* w,
                    int64_t rb, int64_t nb, int64_t out, float* y) {
  const int parts = Parts(pool, n * out * 4);
  const int64_t padded = nb * kQBlock;
  thread_local std::vector<float> partial;
  partial.resize(static_cast<size_t>(parts) * padded);
  float* buf = partial.data();
  if (parts == 1) {
    QAxpyRows<Kind>(xk, rows, n, w, rb, nb, buf);
  } else {
    ParallelFor(pool, parts, [&](int t) {
      const int64_t r0 = n * t / parts, r1 = n * (t + 1) / parts;
      QAxpyRows<Kind>(xk + r0, rows + r0, r1 - r0, w, rb, nb, buf + t * padded);
    });
  }
  for (int64_t o = 0; o < out; ++o) {
    float s = buf[o];
    for (int t = 1; t < parts; ++t) s += buf[t * padded + o];
    y[o] = s;
  }
}

void QSparseMatvec(ffi::ThreadPool& pool, int64_t kind, const float* xk, const int32_t* rows, int64_t n,
                   const uint8_t* w, int64_t rb, int64_t nb, int64_t out, float* y) {
  if (kind == 8) QSparseMatvecT<8>(pool, xk, rows, n, w, rb, nb, out, y);
  else QSparseMatvecT<4>(pool, xk, rows, n, w, rb, nb, out, y);
}

// Checks a quantized weight w [in, rb] of `cols` values per row and kind 8 / 4; sets in, nb, rb.
bool CheckQ(const ffi::Buffer<ffi::U8>& w, int64_t kind, int64_t cols, int64_t* in, int64_t* nb, int64_t* rb,
            ffi::Error* error) {
  auto wd = w.dimensions();
  if (kind != 8 && kind != 4) {
    *error = ffi::Error::InvalidArgument("kind must be 8 (q8) or 4 (q4)");
    return false;
  }
  if (wd.size() != 2 || cols < 1) {
    *error = ffi::Error::InvalidArgument("w must be 2-D [rows, row_bytes] and cols >= 1");
    return false;
  }
  *in = wd[0];
  *rb = wd[1];
  *nb = (cols + kQBlock - 1) / kQBlock;
  if (*rb != *nb * (kind == 8 ? QBlockBytes<8>() : QBlockBytes<4>())) {
    *error = ffi::Error::InvalidArgument("w's row length does not match cols and kind");
    return false;
  }
  return true;
}

ffi::Error QGatherMatvecImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> xk, ffi::Buffer<ffi::S32> rows,
                             ffi::Buffer<ffi::U8> w, ffi::Buffer<ffi::S32> count, ffi::ResultBuffer<ffi::F32> y,
                             int64_t kind, int64_t cols) {
  int64_t in, nb, rb;
  ffi::Error error = ffi::Error::Success();
  if (!CheckQ(w, kind, cols, &in, &nb, &rb, &error)) return error;
  if (y->element_count() != cols) return ffi::Error::InvalidArgument("y must have `cols` elements");
  const int64_t k = rows.element_count();
  if (xk.element_count() != k) return ffi::Error::InvalidArgument("xk and rows differ in length");
  if (count.element_count() != 1) return ffi::Error::InvalidArgument("count must have one element");
  const int64_t n = std::max<int64_t>(0, std::min<int64_t>(k, count.typed_data()[0]));
  const int32_t* r = rows.typed_data();
  for (int64_t j = 0; j < n; ++j) {
    if (r[j] < 0 || r[j] >= in) return ffi::Error::InvalidArgument("row index out of range");
  }
  QSparseMatvec(pool, kind, xk.typed_data(), r, n, w.typed_data(), rb, nb, cols, y->typed_data());
  return ffi::Error::Success();
}

// The dense decode product x [in] @ W [in, cols] on quantized rows: every row, in order.
ffi::Error QMatvecImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::U8> w,
                       ffi::ResultBuffer<ffi::F32> y, int64_t kind, int64_t cols) {
  int64_t in, nb, rb;
  ffi::Error error = ffi::Error::Success();
  if (!CheckQ(w, kind, cols, &in, &nb, &rb, &error)) return error;
  if (y->element_count() != cols) return ffi::Error::InvalidArgument("y must have `cols` elements");
  if (x.element_count() != in) return ffi::Error::InvalidArgument("x must have `in` elements");
  thread_local std::vector<int32_t> all;
  if (static_cast<int64_t>(all.size()) < in) {
    const int64_t old = all.size();
    all.resize(in);
    for (int64_t i = old; i < in; ++i) all[i] = static_cast<int32_t>(i);
  }
  QSparseMatvec(pool, kind, x.typed_data(), all.data(), in, w.typed_data(), rb, nb, cols, y->typed_data());
  return ffi::Error::Success();
}

// TopkMatvec on quantized rows: the same selection (SelectActive), then the quantized product.
ffi::Error QTopkMatvecImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> threshold,
                           ffi::Buffer<ffi::U8> w, ffi::ResultBuffer<ffi::F32> y, int64_t k, int64_t use_threshold,
                           int64_t index, int64_t kind, int64_t cols) {
  int64_t in, nb, rb;
  ffi::Error error = ffi::Error::Success();
  if (!CheckQ(w, kind, cols, &in, &nb, &rb, &error)) return error;
  if (y->element_count() != cols) return ffi::Error::InvalidArgument("y must have `cols` elements");
  if (x.element_count() != in) return ffi::Error::InvalidArgument("x must have `in` elements");
  if (k < 1 || k > in) return ffi::Error::InvalidArgument("k must be in [1, in]");
  if (index < 0 || index >= threshold.element_count()) return ffi::Error::InvalidArgument("threshold index out of range");
  thread_local std::vector<int32_t> bits, rows;
  thread_local std::vector<float> xk;
  SelectActive(x.typed_data(), in, k, threshold.typed_data()[index], use_threshold, bits, &rows, &xk);
  QSparseMatvec(pool, kind, xk.data(), rows.data(), static_cast<int64_t>(rows.size()), w.typed_data(), rb, nb, cols,
                y->typed_data());
  return ffi::Error::Success();
}

// RowsDot on quantized rows (the head on a quantized embedding [V, d]). Each value is widened to
// exactly the f32 the widened table holds (d * q, + m for q4) and summed in RowsDot's sixteen lanes,
// so the logits equal RowsDot's on the widened table bit for bit (an exact Q8_0 embedding of an f32
// store gives the f32 engine's logits), from 3.8x / 6.4x fewer bytes. Rows whose length is not a
// multiple of 32 are widened into an L1 buffer first.
template <int Kind>
void QRowsDot(const uint8_t* __restrict__ e, int64_t rb, int64_t nb, const float* __restrict__ x, int64_t d,
              int64_t v0, int64_t v1, float* __restrict__ y) {
  constexpr int L = 16;
  constexpr int64_t BB = QBlockBytes<Kind>();
  int64_t v = v0;
#ifdef __AVX2__
  if (d % kQBlock == 0) {
    for (; v < v1; ++v) {
      const uint8_t* row = e + v * rb;
      __m256 a = _mm256_setzero_ps(), b = _mm256_setzero_ps();  // lanes 0..7, 8..15
      for (int64_t blk = 0; blk < nb; ++blk) {
        const uint8_t* blkp = row + blk * BB;
        const __m256 dv = _mm256_set1_ps(LoadHalf(blkp));
        const float* xb = x + blk * kQBlock;
        __m256 w0, w1, w2, w3;
        if constexpr (Kind == 8) {
          const __m128i lo = _mm_loadu_si128(reinterpret_cast<const __m128i*>(blkp + 2));
          const __m128i hi = _mm_loadu_si128(reinterpret_cast<const __m128i*>(blkp + 18));
          w0 = _mm256_mul_ps(dv, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(lo)));
          w1 = _mm256_mul_ps(dv, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(lo, 8))));
          w2 = _mm256_mul_ps(dv, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(hi)));
          w3 = _mm256_mul_ps(dv, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(hi, 8))));
        } else {
          const __m256 mv = _mm256_set1_ps(LoadHalf(blkp + 2));
          const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(blkp + 4));
          const __m128i mask = _mm_set1_epi8(15);
          const __m128i lo = _mm_and_si128(bytes, mask), hi = _mm_and_si128(_mm_srli_epi16(bytes, 4), mask);
          w0 = _mm256_fmadd_ps(dv, _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(lo)), mv);
          w1 = _mm256_fmadd_ps(dv, _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(lo, 8))), mv);
          w2 = _mm256_fmadd_ps(dv, _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(hi)), mv);
          w3 = _mm256_fmadd_ps(dv, _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(hi, 8))), mv);
        }
        a = _mm256_fmadd_ps(w0, _mm256_loadu_ps(xb), a);
        b = _mm256_fmadd_ps(w1, _mm256_loadu_ps(xb + 8), b);
        a = _mm256_fmadd_ps(w2, _mm256_loadu_ps(xb + 16), a);
        b = _mm256_fmadd_ps(w3, _mm256_loadu_ps(xb + 24), b);
      }
      alignas(32) float lanes[L];
      _mm256_store_ps(lanes, a);
      _mm256_store_ps(lanes + 8, b);
      float s = 0.0f;
      for (int l = 0; l < L; ++l) s += lanes[l];
      y[v] = s;
    }
    return;
  }
#endif
  thread_local std::vector<float> buf;
  buf.resize(nb * kQBlock);
  float* __restrict__ r = buf.data();
  for (; v < v1; ++v) {
    const uint8_t* row = e + v * rb;
    for (int64_t blk = 0; blk < nb; ++blk) WidenBlock<Kind>(row + blk * BB, r + blk * kQBlock);
    float a[L] = {};
    for (int64_t o = 0; o + L <= d; o += L)
      for (int l = 0; l < L; ++l) a[l] += r[o + l] * x[o + l];
    float s = 0.0f;
    for (int l = 0; l < L; ++l) s += a[l];
    for (int64_t o = d - d % L; o < d; ++o) s += r[o] * x[o];
    y[v] = s;
  }
}

ffi::Error QRowsDotImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::U8> e,
                        ffi::ResultBuffer<ffi::F32> y, int64_t kind, int64_t cols) {
  int64_t v, nb, rb;
  ffi::Error error = ffi::Error::Success();
  if (!CheckQ(e, kind, cols, &v, &nb, &rb, &error)) return error;
  if (x.element_count() != cols) return ffi::Error::InvalidArgument("x must have `cols` elements");
  if (y->element_count() != v) return ffi::Error::InvalidArgument("y must have V elements");
  const int parts = Parts(pool, v * cols);
  const uint8_t* ep = e.typed_data();
  const float* xp = x.typed_data();
  float* yp = y->typed_data();
  ParallelFor(pool, parts, [&](int t) {
    const int64_t b0 = v * t / parts, b1 = v * (t + 1) / parts;
    if (kind == 8) QRowsDot<8>(ep, rb, nb, xp, cols, b0, b1, yp);
    else QRowsDot<4>(ep, rb, nb, xp, cols, b0, b1, yp);
  });
  return ffi::Error::Success();
}


// Selection for one decoded token's op whose rows live in a slot pool (the DRAM-budget runtime):
// the active channels of x by SelectActive's rule (all of them when k >= in: a dense layer),
// their values, and their pool slots from row `layer` of the channel-to-slot map (-1: the pool
// lacks the row; padding: `trash`); counts = (active, missing). The layer's LFU counters of the
// active channels are incremented in place (freq_out aliases freq). Summing the product later
// over these slots in this order equals AfTopkMatvec's sum over the same rows.
ffi::Error PoolSelectImpl(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> threshold, ffi::Buffer<ffi::S32> slot_map,
                          ffi::Buffer<ffi::S32> freq, ffi::Buffer<ffi::S32> layer_arg, ffi::ResultBuffer<ffi::S32> idx,
                          ffi::ResultBuffer<ffi::F32> xk, ffi::ResultBuffer<ffi::S32> slots,
                          ffi::ResultBuffer<ffi::S32> counts, ffi::ResultBuffer<ffi::S32> freq_out, int64_t k,
                          int64_t use_threshold, int64_t trash) {
  const int64_t in = x.element_count();
  if (layer_arg.element_count() != 1 || threshold.element_count() != 1)
    return ffi::Error::InvalidArgument("layer and threshold must have one element");
  const int64_t layer = layer_arg.typed_data()[0];
  auto md = slot_map.dimensions();
  if (md.size() != 2 || md[1] != in) return ffi::Error::InvalidArgument("slot_map must be [layers, in]");
  if (freq.element_count() != slot_map.element_count()) return ffi::Error::InvalidArgument("freq must match slot_map");
  if (layer < 0 || layer >= md[0]) return ffi::Error::InvalidArgument("layer out of range");
  if (k < 1 || idx->element_count() != k || xk->element_count() != k || slots->element_count() != k ||
      counts->element_count() != 2)
    return ffi::Error::InvalidArgument("outputs must have k (and 2) elements");
  thread_local std::vector<int32_t> bits, rows;
  thread_local std::vector<float> vals;
  const float* xp = x.typed_data();
  if (k >= in) {
    rows.resize(in);
    vals.assign(xp, xp + in);
    for (int64_t i = 0; i < in; ++i) rows[i] = static_cast<int32_t>(i);
  } else {
    SelectActive(xp, in, k, threshold.typed_data()[0], use_threshold, bits, &rows, &vals);
  }
  const int32_t* map_row = slot_map.typed_data() + layer * in;
  int32_t* f = freq_out->typed_data() + layer * in;  // == freq's buffer (aliased)
  int32_t* ip = idx->typed_data();
  float* vp = xk->typed_data();
  int32_t* sp = slots->typed_data();
  const int64_t n = static_cast<int64_t>(rows.size());
  int32_t missing = 0;
  for (int64_t j = 0; j < n; ++j) {
    const int32_t c = rows[j];
    ip[j] = c;
    vp[j] = vals[j];
    sp[j] = map_row[c];
    missing += map_row[c] < 0;
    f[c] += 1;
  }
  for (int64_t j = n; j < k; ++j) {
    ip[j] = 0;
    vp[j] = 0.0f;
    sp[j] = static_cast<int32_t>(trash);
  }
  counts->typed_data()[0] = static_cast<int32_t>(n);
  counts->typed_data()[1] = missing;
  return ffi::Error::Success();
}

}  // namespace


XLA_FFI_DEFINE_HANDLER_SYMBOL(AfActiveMask, ActiveMaskImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("k")
                                  .Attr<int64_t>("use_threshold"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(AfTopkMatvec, TopkMatvecImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("k")
                                  .Attr<int64_t>("use_threshold")
                                  .Attr<int64_t>("index"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(AfRowsDot, RowsDotImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(AfGatherMatvec, GatherMatvecImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(AfAttendOne, AttendOneImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("heads")
                                  .Attr<int64_t>("kv_heads")
                                  .Attr<int64_t>("head_dim")
                                  .Attr<int64_t>("attn_len")
                                  .Attr<float>("theta"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(AfRmsNormOne, RmsNormOneImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<float>("eps"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(AfQGatherMatvec, QGatherMatvecImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::U8>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("kind")
                                  .Attr<int64_t>("cols"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(AfQMatvec, QMatvecImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::U8>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("kind")
                                  .Attr<int64_t>("cols"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(AfQTopkMatvec, QTopkMatvecImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::U8>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("k")
                                  .Attr<int64_t>("use_threshold")
                                  .Attr<int64_t>("index")
                                  .Attr<int64_t>("kind")
                                  .Attr<int64_t>("cols"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(AfQRowsDot, QRowsDotImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::U8>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("kind")
                                  .Attr<int64_t>("cols"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(AfPoolSelect, PoolSelectImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::S32>>()
                                  .Attr<int64_t>("k")
                                  .Attr<int64_t>("use_threshold")
                                  .Attr<int64_t>("trash"));
