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
// them).
//
// Policy (bounded by recent demand, nothing to tune): every call of a backward op is a *round*
// (begin_round()).  A buffer is kept while it is in use or was in use during the last
// kIdleRounds rounds; one that has been idle longer goes back to torch's allocator at the start
// of the next round.  In the steady state (the same sizes every step, up to kIdleRounds backward
// calls per step) every gradient reuses a buffer; with sizes that vary from step to step (a
// ragged last batch, variable batch sizes) the pool holds at most the buffers of the last few
// rounds instead of one per size ever seen.  LWKD_CPU_POOL_MB caps the total on top (default
// 4096; 0 disables the pool); torch.ops.lwkd.cpu_buffer_pool(True) releases every idle buffer now.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/EmptyTensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/empty_strided.h>

#include <cstdint>
#include <cstdlib>
#include <mutex>
#include <vector>

namespace lwkd {

class CpuBufferPool {
 public:
  // Rounds a buffer may stay idle before it is released.
  static constexpr uint64_t kIdleRounds = 4;

  static CpuBufferPool& instance() {
    static CpuBufferPool pool;
    return pool;
  }

  // Starts a round (one backward call): buffers in use are marked as used in this round, those
  // idle for more than kIdleRounds rounds are released.
  void begin_round() {
    if (capacity_ == 0) return;
    std::lock_guard<std::mutex> lock(mu_);
    ++round_;
    std::vector<Entry> keep;
    keep.reserve(pool_.size());
    for (auto& e : pool_) {
      if (e.storage.use_count() > 1) e.last_used = round_;
      if (round_ - e.last_used <= kIdleRounds) keep.push_back(std::move(e));
    }
    pool_.swap(keep);
    recount_locked();
  }

  // Same sizes, strides and dtype as at::empty_like(x) on the CPU.
  at::Tensor empty_like(const at::Tensor& x) {
    const at::Tensor meta = at::empty_like(x, x.options().device(at::kMeta));
    const size_t need = at::detail::computeStorageNbytes(meta.sizes(), meta.strides(), x.element_size());
    if (capacity_ == 0 || need < kMinBytes) return at::empty_like(x);
    std::lock_guard<std::mutex> lock(mu_);
    for (size_t i = 0; i < pool_.size(); ++i) {
      Entry& e = pool_[i];
      if (e.storage.use_count() == 1 && e.storage.nbytes() == need) {
        Entry found = e;  // move to the back: most recently used
        found.last_used = round_;
        pool_.erase(pool_.begin() + static_cast<std::ptrdiff_t>(i));
        pool_.push_back(found);
        return at::empty({0}, x.options()).set_(found.storage, 0, meta.sizes(), meta.strides());
      }
    }
    at::Tensor fresh = at::empty_strided(meta.sizes(), meta.strides(), x.options());
    pool_.push_back(Entry{fresh.storage(), round_});
    held_ += need;
    evict_locked();
    return fresh;
  }

  // Drops every idle buffer if `release`; returns the bytes the pool still references.
  int64_t report(bool release) {
    std::lock_guard<std::mutex> lock(mu_);
    if (release) {
      std::vector<Entry> keep;
      for (auto& e : pool_)
        if (e.storage.use_count() > 1) keep.push_back(e);
      pool_.swap(keep);
      recount_locked();
    }
    return static_cast<int64_t>(held_);
  }

 private:
  static constexpr size_t kMinBytes = size_t(1) << 20;  // small outputs: the allocator is fine

  struct Entry {
    c10::Storage storage;
    uint64_t last_used;  // the last round in which it was handed out or seen in use
  };

  CpuBufferPool() {
    const char* env = std::getenv("LWKD_CPU_POOL_MB");
    const long long mb = env ? std::atoll(env) : 4096;
    capacity_ = mb > 0 ? static_cast<size_t>(mb) << 20 : 0;
  }

  void recount_locked() {
    held_ = 0;
    for (auto& e : pool_) held_ += e.storage.nbytes();
  }

  // Over capacity: the least recently used idle buffers go first; buffers in use stay.
  void evict_locked() {
    for (size_t i = 0; held_ > capacity_ && i < pool_.size();) {
      if (pool_[i].storage.use_count() == 1) {
        held_ -= pool_[i].storage.nbytes();
        pool_.erase(pool_.begin() + static_cast<std::ptrdiff_t>(i));
      } else {
        ++i;
      }
    }
  }

  std::mutex mu_;
  std::vector<Entry> pool_;
  size_t held_ = 0;
  size_t capacity_ = 0;
  uint64_t round_ = 0;
};

}  // namespace lwkd
