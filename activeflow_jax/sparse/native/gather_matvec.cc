// Sparse matrix-vector products over selected rows, as XLA FFI custom calls for the CPU.
//
//   AfGatherMatvec: y[o] = sum_j xk[j] * W[rows[j], o]   (W row-major [in, out]; rows ascending)
//   AfTopkMatvec:   the same over the active channels of x, selected here (see TopkMatvecImpl)
//
// XLA:CPU can only do this as a gather (a copy of the k rows into a temporary, ~5 GB/s) followed
// by a dot, which costs more than the dense product it replaces. Here each selected row is
// streamed once, straight from W, as an axpy into the output.
#include <algorithm>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

// y[col0:col1] = sum_j xk[j] * W[rows[j], col0:col1], four rows per pass so y is loaded and
// stored a quarter as often.
void AxpyRows(const float* __restrict__ xk, const int32_t* __restrict__ rows, int64_t k,
              const float* __restrict__ w, int64_t out, int64_t col0, int64_t col1, float* __restrict__ y) {
  float* __restrict__ yc = y + col0;
  const int64_t n = col1 - col0;
  std::fill(yc, yc + n, 0.0f);
  int64_t j = 0;
  for (; j + 4 <= k; j += 4) {
    const float a0 = xk[j], a1 = xk[j + 1], a2 = xk[j + 2], a3 = xk[j + 3];
    const float* __restrict__ r0 = w + static_cast<int64_t>(rows[j]) * out + col0;
    const float* __restrict__ r1 = w + static_cast<int64_t>(rows[j + 1]) * out + col0;
    const float* __restrict__ r2 = w + static_cast<int64_t>(rows[j + 2]) * out + col0;
    const float* __restrict__ r3 = w + static_cast<int64_t>(rows[j + 3]) * out + col0;
    for (int64_t o = 0; o < n; ++o) yc[o] += a0 * r0[o] + a1 * r1[o] + a2 * r2[o] + a3 * r3[o];
  }
  for (; j < k; ++j) {
    const float a = xk[j];
    const float* __restrict__ r = w + static_cast<int64_t>(rows[j]) * out + col0;
    for (int64_t o = 0; o < n; ++o) yc[o] += a * r[o];
  }
}

// A small persistent pool: spawning threads per call would cost more than the product itself.
class Pool {
 public:
  static Pool& Get() {
    static Pool* pool = new Pool(std::max(1u, std::thread::hardware_concurrency()));
    return *pool;
  }
  int size() const { return static_cast<int>(workers_.size()) + 1; }

  // Runs fn(0..n-1), fn(0) on the calling thread; returns when all are done.
  void Run(int n, const std::function<void(int)>& fn) {
    std::lock_guard<std::mutex> serial(run_mutex_);
    n = std::min(n, size());
    {
      std::lock_guard<std::mutex> lock(mutex_);
      task_ = &fn;
      active_ = n - 1;
      pending_ = n - 1;
      ++generation_;
    }
    wake_.notify_all();
    fn(0);
    std::unique_lock<std::mutex> lock(mutex_);
    done_.wait(lock, [&] { return pending_ == 0; });
  }

 private:
  explicit Pool(unsigned threads) {
    for (unsigned i = 1; i < threads; ++i) workers_.emplace_back([this, i] { Loop(static_cast<int>(i)); });
    for (auto& t : workers_) t.detach();
  }
  void Loop(int index) {
    int64_t seen = 0;
    for (;;) {
      const std::function<void(int)>* task;
      {
        std::unique_lock<std::mutex> lock(mutex_);
        wake_.wait(lock, [&] { return generation_ != seen; });
        seen = generation_;
        if (index > active_) continue;
        task = task_;
      }
      (*task)(index);
      std::lock_guard<std::mutex> lock(mutex_);
      if (--pending_ == 0) done_.notify_one();
    }
  }
  std::vector<std::thread> workers_;
  std::mutex run_mutex_, mutex_;
  std::condition_variable wake_, done_;
  const std::function<void(int)>* task_ = nullptr;
  int64_t generation_ = 0;
  int active_ = 0, pending_ = 0;
};

ffi::Error GatherMatvecImpl(ffi::Buffer<ffi::F32> xk, ffi::Buffer<ffi::S32> rows, ffi::Buffer<ffi::F32> w,
                            ffi::ResultBuffer<ffi::F32> y) {
  auto wd = w.dimensions();
  if (wd.size() != 2) return ffi::Error::InvalidArgument("w must be 2-D [in, out]");
  const int64_t in = wd[0], out = wd[1];
  const int64_t k = rows.element_count();
  if (xk.element_count() != k) return ffi::Error::InvalidArgument("xk and rows differ in length");
  if (y->element_count() != out) return ffi::Error::InvalidArgument("y must have `out` elements");
  const int32_t* r = rows.typed_data();
  for (int64_t j = 0; j < k; ++j) {
    if (r[j] < 0 || r[j] >= in) return ffi::Error::InvalidArgument("row index out of range");
  }
  const float* x = xk.typed_data();
  const float* wp = w.typed_data();
  float* yp = y->typed_data();
  Pool& pool = Pool::Get();
  // below ~128 KiB of rows a second thread costs more than it saves
  const int threads = (k * out * 4 < (128 << 10)) ? 1 : pool.size();
  if (threads == 1) {
    AxpyRows(x, r, k, wp, out, 0, out, yp);
    return ffi::Error::Success();
  }
  // columns split in multiples of 16 floats (a 64-byte line), so threads never share a line of y
  const int64_t per = ((out + threads - 1) / threads + 15) / 16 * 16;
  pool.Run(threads, [&](int t) {
    const int64_t c0 = std::min(out, t * per), c1 = std::min(out, (t + 1) * per);
    if (c0 < c1) AxpyRows(x, r, k, wp, out, c0, c1, yp);
  });
  return ffi::Error::Success();
}

// Selection + product in one call, for decode: the active rows of x are the channels with
// |x| >= max(k-th largest |x|, threshold) (threshold only if use_threshold), at most k of them,
// lowest indices first among ties -- the same rule as kernels.active_mask.
ffi::Error TopkMatvecImpl(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> threshold, ffi::Buffer<ffi::F32> w,
                          ffi::ResultBuffer<ffi::F32> y, int64_t k, int64_t use_threshold) {
  auto wd = w.dimensions();
  if (wd.size() != 2) return ffi::Error::InvalidArgument("w must be 2-D [in, out]");
  const int64_t in = wd[0], out = wd[1];
  if (x.element_count() != in) return ffi::Error::InvalidArgument("x must have `in` elements");
  if (y->element_count() != out) return ffi::Error::InvalidArgument("y must have `out` elements");
  if (k < 1 || k > in) return ffi::Error::InvalidArgument("k must be in [1, in]");
  const float* xp = x.typed_data();
  thread_local std::vector<float> mags;
  thread_local std::vector<int32_t> rows;
  thread_local std::vector<float> xk;
  mags.resize(in);
  for (int64_t i = 0; i < in; ++i) mags[i] = std::fabs(xp[i]);
  std::vector<float> scratch(mags);
  std::nth_element(scratch.begin(), scratch.begin() + (k - 1), scratch.end(), std::greater<float>());
  float cut = scratch[k - 1];
  if (use_threshold) cut = std::max(cut, threshold.typed_data()[0]);
  rows.clear();
  xk.clear();
  for (int64_t i = 0; i < in && static_cast<int64_t>(rows.size()) < k; ++i) {
    if (mags[i] >= cut) {
      rows.push_back(static_cast<int32_t>(i));
      xk.push_back(xp[i]);
    }
  }
  const int64_t n = static_cast<int64_t>(rows.size());
  float* yp = y->typed_data();
  Pool& pool = Pool::Get();
  const int threads = (n * out * 4 < (128 << 10)) ? 1 : pool.size();
  if (threads == 1) {
    AxpyRows(xk.data(), rows.data(), n, w.typed_data(), out, 0, out, yp);
    return ffi::Error::Success();
  }
  // Rows are split between threads (each streams whole rows: long contiguous reads), each into
  // its own partial output; the partials are summed at the end (out floats per thread: cheap).
  static std::vector<std::vector<float>> partials;
  if (static_cast<int>(partials.size()) < threads) partials.resize(threads);
  for (int t = 1; t < threads; ++t) partials[t].resize(out);
  const float* wp = w.typed_data();
  const float* xkp = xk.data();
  const int32_t* rp = rows.data();
  pool.Run(threads, [&](int t) {
    const int64_t r0 = n * t / threads, r1 = n * (t + 1) / threads;
    float* dst = t == 0 ? yp : partials[t].data();
    AxpyRows(xkp + r0, rp + r0, r1 - r0, wp, out, 0, out, dst);
  });
  for (int t = 1; t < threads; ++t) {
    const float* p = partials[t].data();
    for (int64_t o = 0; o < out; ++o) yp[o] += p[o];
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(AfTopkMatvec, TopkMatvecImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("k")
                                  .Attr<int64_t>("use_threshold"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(AfGatherMatvec, GatherMatvecImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
