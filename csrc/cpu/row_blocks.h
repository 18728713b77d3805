// The CPU GEMM recurrences, split over torch's threads by samples: each thread runs the whole
// recurrence for one block of rows (its products single-threaded, its elementwise steps serial), and
// the blocks' results, sums over samples, are added at the end. Against one recurrence with every
// product and pass split over the threads this saves a fork and join per step (about 40 for three
// layers) and keeps each thread on its own rows.
#pragma once
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <unistd.h>

#include "stack.h"

namespace hessext {

// Threads worth using for `work` multiply-adds: at least `per_thread` each (for BLAS-speed work about
// 256k), at most the pool.
inline int64_t threads_for(int64_t work, int64_t per_thread = int64_t(1) << 18) {
  return std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), work / per_thread));
}

// This CPU's L2 cache per core in bytes (1 MB where the system does not say).
inline int64_t l2_cache_bytes() {
  static const int64_t bytes = [] {
    const long b = sysconf(_SC_LEVEL2_CACHE_SIZE);
    return b > 0 ? static_cast<int64_t>(b) : int64_t(1) << 20;
  }();
  return bytes;
}

// job(t) for t in [0, nt), one per thread, each in the calling thread's dispatch state. at::parallel_for's
// workers start in the default state, so ATen ops there would pass through the autograd and
// ADInplaceOrView kernels (and their views would get autograd metadata) that the calling thread, below
// them (hessext._C's entries), skips, and the worker's block would take a fifth longer than the
// calling thread's.
template <class Job>
void run_per_thread(int64_t nt, Job&& job) {
  const c10::impl::LocalDispatchKeySet state = c10::impl::tls_local_dispatch_key_set();
  at::parallel_for(0, nt, 1, [&](int64_t t0, int64_t t1) {
    const c10::impl::ForceDispatchKeyGuard same_state(state);
    for (int64_t t = t0; t < t1; ++t) job(t);
  });
}

// run(block) for nt blocks of s's samples, one per thread: the blocks' results in row order.
template <class Run>
auto run_row_blocks(const Stack& s, int64_t nt, Run&& run) {
  std::vector<decltype(run(s))> parts(nt);
  run_per_thread(nt, [&](int64_t t) { parts[t] = run(s.rows(t * s.M / nt, (t + 1) * s.M / nt)); });
  return parts;
}

constexpr int64_t kMinBlockRows = 16;

// run(block) for blocks of s's samples, one per thread, summed; run(s) itself (its products and passes
// split over the threads) where one thread suffices, or where the blocks would be short and the work
// large: then each block's weight-sized products (sums over only M / threads samples) and the final
// sum of the blocks' results cost more than the joins save.
template <class Run>
std::vector<at::Tensor> sum_over_row_blocks(const Stack& s, int64_t work, Run&& run) {
  constexpr int64_t kTallRows = 256, kSmallWork = int64_t(1) << 24;
  const int64_t nt = std::min(threads_for(work), s.M / kMinBlockRows);
  if (nt <= 1 || at::in_parallel_region() || (s.M / nt < kTallRows && work > kSmallWork)) return run(s);
  std::vector<std::vector<at::Tensor>> parts = run_row_blocks(s, nt, run);
  for (size_t j = 0; j < parts[0].size(); ++j) {  // one loop per result, not an ATen add_ per block
    if (!parts[0][j].is_contiguous()) parts[0][j] = parts[0][j].contiguous();
    AT_DISPATCH_FLOATING_TYPES(parts[0][j].scalar_type(), "sum_over_row_blocks", [&] {
      scalar_t* acc = parts[0][j].data_ptr<scalar_t>();
      const int64_t n = parts[0][j].numel();
      for (int64_t t = 1; t < nt; ++t) {
        const at::Tensor block = parts[t][j].contiguous();
        const scalar_t* part = block.data_ptr<scalar_t>();
        for (int64_t e = 0; e < n; ++e) acc[e] += part[e];
      }
    });
  }
  return parts[0];
}

// run(block) for blocks of s's samples, one per thread, for results with one entry per sample along
// `dim` ([M, ...], or the jets' [channels, M, C] with dim 1): the blocks' results joined in row order.
// Nothing is summed, so every block size pays.
template <class Run>
at::Tensor cat_over_row_blocks(const Stack& s, int64_t work, Run&& run, int64_t dim = 0) {
  const int64_t nt = std::min(threads_for(work), s.M / kMinBlockRows);
  if (nt <= 1 || at::in_parallel_region()) return run(s);
  return at::cat(run_row_blocks(s, nt, run), dim);
}

}  // namespace hessext
