// hessext::Workspace (workspace.h): one arena per calling thread, handed out last in first out.
#include "workspace.h"

#include <sys/mman.h>

#include <algorithm>
#include <cstdint>

namespace hessext {
namespace {

constexpr int64_t kAlign = 64;

struct Arena {
  at::Tensor buf;    // uint8 [capacity], or undefined
  int64_t used = 0;  // bytes handed out; beyond the capacity they came from at::empty
  int64_t peak = 0;  // the most `used` of the current outermost Workspace
  int depth = 0;     // Workspaces alive in this thread
  int64_t capacity() const { return buf.defined() ? buf.numel() : 0; }
};

Arena& arena() {
  thread_local Arena a;
  return a;
}

}  // namespace

Workspace::Workspace(const at::Device& device) : cpu_(device.is_cpu()) {
  if (!cpu_) return;
  Arena& a = arena();
  ++a.depth;
  mark_ = a.used;
}

Workspace::~Workspace() {
  if (!cpu_) return;
  Arena& a = arena();
  a.used = mark_;
  if (--a.depth > 0) return;
  // Reuse the arena only where nothing but the arena holds it, and grow it to this call's peak.
  const bool escaped = a.buf.defined() && a.buf.storage().use_count() > 1;
  if (escaped || a.peak > a.capacity()) {
    a.buf = at::Tensor();
    if (a.peak <= kKeepBytes) a.buf = empty_output({a.peak}, at::TensorOptions().dtype(at::kByte));
  }
  a.peak = 0;
}

at::Tensor Workspace::empty(at::IntArrayRef shape, const at::TensorOptions& options) const {
  Arena& a = arena();
  if (!cpu_ || a.depth == 0) return at::empty(shape, options);
  const int64_t itemsize = static_cast<int64_t>(options.dtype().itemsize());
  const int64_t bytes = (c10::multiply_integers(shape) * itemsize + kAlign - 1) / kAlign * kAlign;
  const int64_t at = a.used;
  a.used += bytes;
  a.peak = std::max(a.peak, a.used);
  if (a.used > a.capacity()) return at::empty(shape, options);
  // at::empty's own construction (one TensorImpl on the arena's storage), without a dispatch
  at::Tensor t = at::detail::make_tensor<c10::TensorImpl>(c10::Storage(a.buf.storage()),
                                                          c10::DispatchKeySet(c10::DispatchKey::CPU), options.dtype());
  t.unsafeGetTensorImpl()->set_sizes_contiguous(shape);
  t.unsafeGetTensorImpl()->set_storage_offset(at / itemsize);
  return t;
}

namespace {
// A tensor of this shape on the storage of buf (uint8), from its start.
at::Tensor on_storage(const at::Tensor& buf, at::IntArrayRef shape, const at::TensorOptions& options) {
  at::Tensor t = at::detail::make_tensor<c10::TensorImpl>(c10::Storage(buf.storage()),
                                                          c10::DispatchKeySet(c10::DispatchKey::CPU), options.dtype());
  t.unsafeGetTensorImpl()->set_sizes_contiguous(shape);
  return t;
}
}  // namespace

at::Tensor kept_empty(at::IntArrayRef shape, const at::TensorOptions& options) {
  if (!options.device().is_cpu()) return at::empty(shape, options);
  thread_local std::vector<at::Tensor> pool;  // uint8 buffers; free where the pool holds the only reference
  const int64_t bytes = c10::multiply_integers(shape) * static_cast<int64_t>(options.dtype().itemsize());
  const auto is_free = [](const at::Tensor& b) { return b.storage().use_count() == 1; };
  at::Tensor* best = nullptr;  // the smallest free buffer that holds it, wasting at most half
  for (auto& b : pool)
    if (is_free(b) && b.numel() >= bytes && b.numel() <= 2 * bytes + 4096 && (!best || b.numel() < best->numel()))
      best = &b;
  if (best) return on_storage(*best, shape, options);
  int64_t held = 0;
  for (const auto& b : pool) held += b.numel();
  if (held + bytes > kKeepBytes) {  // make room: drop free buffers, largest first
    std::sort(pool.begin(), pool.end(), [](const at::Tensor& a, const at::Tensor& b) { return a.numel() > b.numel(); });
    for (auto it = pool.begin(); it != pool.end() && held + bytes > kKeepBytes;) {
      if (is_free(*it)) {
        held -= it->numel();
        it = pool.erase(it);
      } else {
        ++it;
      }
    }
  }
  if (held + bytes > kKeepBytes) return empty_output(shape, options);
  pool.push_back(empty_output({bytes}, at::TensorOptions().dtype(at::kByte)));
  return on_storage(pool.back(), shape, options);
}

int64_t workspace_bytes() { return arena().capacity(); }

at::Tensor empty_output(at::IntArrayRef shape, const at::TensorOptions& options) {
  at::Tensor t = at::empty(shape, options);
  const int64_t bytes = t.nbytes();
  if (!t.is_cpu() || bytes < kHugeBytes) return t;
  constexpr uintptr_t kPage = 4096;
  const auto begin = reinterpret_cast<uintptr_t>(t.data_ptr());
  const uintptr_t first = (begin + kPage - 1) / kPage * kPage, last = (begin + bytes) / kPage * kPage;
#ifdef MADV_HUGEPAGE
  madvise(reinterpret_cast<void*>(first), last - first, MADV_HUGEPAGE);  // advice only: failure changes nothing
#endif
  return t;
}

}  // namespace hessext
