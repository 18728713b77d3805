// Scratch memory for a kernel's intermediates, reused from call to call.
//
// A fresh CPU intermediate of a few hundred kB comes from mmap, and the call then pays a page fault
// for every 4 kB of it (up to a fifth of a small HVP's time). So each calling thread keeps
// one arena; a Workspace (one per op call, held by its Stack) hands out 64-byte aligned tensors from
// it and takes them back, last in first out, when it ends. What does not fit comes from at::empty,
// and the arena grows to the call's peak for the next call (up to kKeepBytes; larger peaks are left
// to the allocator). A kernel's outputs never come from here, and the arena is dropped rather than
// reused if any tensor carved from it outlived its call. Other devices (the CUDA caching allocator
// already reuses memory), at::parallel_for workers and calls outside a Workspace get at::empty.
#pragma once
#include <ATen/ATen.h>

namespace hessext {

constexpr int64_t kKeepBytes = int64_t(256) << 20;

class Workspace {
 public:
  explicit Workspace(const at::Device& device);
  ~Workspace();
  Workspace(const Workspace&) = delete;
  Workspace& operator=(const Workspace&) = delete;
  // An uninitialised contiguous tensor for this call's use only.
  at::Tensor empty(at::IntArrayRef shape, const at::TensorOptions& options) const;

 private:
  bool cpu_;
  int64_t mark_ = 0;  // the arena's fill when this Workspace began
};

// Bytes the calling thread's arena holds (for hessext.info and the tests).
int64_t workspace_bytes();

// A kernel's output (or the arena itself): at::empty, and where it is a CPU tensor of kHugeBytes or
// more the kernel is asked to back it with 2 MB pages (madvise MADV_HUGEPAGE, before anything touches
// it; a no-op where transparent huge pages are off). glibc maps every block of 32 MB or more fresh
// from the kernel, so such an output pays a page fault per 4 kB page on every call (a fifth of a dense
// Hessian's time), and under 1% of that in 2 MB pages.
constexpr int64_t kHugeBytes = int64_t(32) << 20;
at::Tensor empty_output(at::IntArrayRef shape, const at::TensorOptions& options);

// A tensor that outlives its call but not for long (the jets an op saves for its backward): CPU
// memory from a per-thread pool of buffers, each handed out again once every tensor on it is gone,
// so that a training loop's forward passes reuse the memory its backward passes released instead of
// faulting in fresh pages each step (kKeepBytes in all; beyond that, empty_output).
at::Tensor kept_empty(at::IntArrayRef shape, const at::TensorOptions& options);

}  // namespace hessext
