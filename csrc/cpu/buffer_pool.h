// Reuse of large CPU output buffers (the gradients of the discrepancy ops).
//
// Why: torch's CPU allocator hands large blocks back to the operating system, so every fresh
// gradient pays one page fault per 4 KiB page on its first write -- for a 32 MiB feature map
// that costs about 4x the write itself.  CUDA tensors come from a caching allocator and never
// see this; on the CPU this pool plays that role for our outputs only.
//
// Safety: a storage is handed out again only when the pool holds the sole reference to it
// (c10::Storage::use_count() == 1): autograd, the user, any view or export of it are done.  Every
// hand-out is a fresh TensorImpl over that storage, so no metadata (requires_grad, hooks) of a
// previous life survives.  Strides are those at::empty_like would give (the fake kernels promise
// them).  LWKD_CPU_POOL_MB sets the capacity (default 4096; 0 disables the pool);
// torch.ops.lwkd.cpu_buffer_pool(True) releases every idle buffer.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/EmptyTensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/empty_strided.h>

#include <cstdlib>
#include <mutex>
#include <vector>

namespace lwkd {

class CpuBufferPool {
 public:
  static CpuBufferPool& instance() {
    static CpuBufferPool pool;
    return pool;
  }

  // Same sizes, strides and dtype as at::empty_like(x) on the CPU.
  at::Tensor empty_like(const at::Tensor& x) {
    const at::Tensor meta = at::empty_like(x, x.options().device(at::kMeta));
    const size_t need = at::detail::computeStorageNbytes(meta.sizes(), meta.strides(), x.element_size());
    if (capacity_ == 0 || need < kMinBytes) return at::empty_like(x);
    std::lock_guard<std::mutex> lock(mu_);
    for (size_t i = 0; i < pool_.size(); ++i) {
      c10::Storage& st = pool_[i];
      if (st.use_count() == 1 && st.nbytes() == need) {
        c10::Storage found = st;  // move to the back: most recently used
        pool_.erase(pool_.begin() + static_cast<std::ptrdiff_t>(i));
        pool_.push_back(found);
        return at::empty({0}, x.options()).set_(found, 0, meta.sizes(), meta.strides());
      }
    }
    at::Tensor fresh = at::empty_strided(meta.sizes(), meta.strides(), x.options());
    pool_.push_back(fresh.storage());
    held_ += need;
    evict_locked();
    return fresh;
  }

  // Drops every idle buffer if `release`; returns the bytes the pool still references.
  int64_t report(bool release) {
    std::lock_guard<std::mutex> lock(mu_);
    if (release) {
      std::vector<c10::Storage> keep;
      for (auto& st : pool_)
        if (st.use_count() > 1) keep.push_back(st);
      pool_.swap(keep);
      recount_locked();
    }
    return static_cast<int64_t>(held_);
  }

 private:
  static constexpr size_t kMinBytes = size_t(1) << 20;  // small outputs: the allocator is fine

  CpuBufferPool() {
    const char* env = std::getenv("LWKD_CPU_POOL_MB");
    const long long mb = env ? std::atoll(env) : 4096;
    capacity_ = mb > 0 ? static_cast<size_t>(mb) << 20 : 0;
  }

  void recount_locked() {
    held_ = 0;
    for (auto& st : pool_) held_ += st.nbytes();
  }

  // Oldest idle buffers go first; buffers still in use are never counted out.
  void evict_locked() {
    for (size_t i = 0; held_ > capacity_ && i < pool_.size();) {
      if (pool_[i].use_count() == 1) {
        held_ -= pool_[i].nbytes();
        pool_.erase(pool_.begin() + static_cast<std::ptrdiff_t>(i));
      } else {
        ++i;
      }
    }
  }

  std::mutex mu_;
  std::vector<c10::Storage> pool_;
  size_t held_ = 0;
  size_t capacity_ = 0;
};

}  // namespace lwkd
