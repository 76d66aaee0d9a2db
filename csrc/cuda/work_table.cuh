// Work tables of the lwkd CUDA kernels: how a host-side list of per-layer / per-tensor records
// reaches the blocks of one launch (the idea of apex's multi_tensor_apply: one launch serves many
// tensors, each block finds its record in a table).  Two carriers:
//
//   LayerTable<Layer>  kernel-argument table (`__grid_constant__`, up to kMaxLayers records and
//                      the index of each record's first tile): no host-to-device copy and no
//                      synchronisation; a block finds its record by binary search over the
//                      first-tile column (find_layer).  The discrepancy kernels use it.
//   DeviceTable        host records of any count packed into one byte buffer (each array 16-byte
//                      aligned) and shipped with ONE asynchronous H2D copy from pinned memory.  The
//                      optimizer kernels use it.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

namespace lwkd {
namespace cuda {

inline int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

inline int64_t round_up(int64_t a, int64_t b) { return (a + b - 1) / b * b; }

// ---------------------------------------------------------------------------------------------
// Kernel-argument table
// ---------------------------------------------------------------------------------------------
constexpr int kMaxLayers = 32;  // records per launch (kernel-argument table)

template <typename Layer>
struct LayerTable {
  int32_t num_layers;
  int64_t B;
  int64_t tile_start[kMaxLayers + 1];
  Layer layer[kMaxLayers];
};

template <class P>
__device__ __forceinline__ int find_layer(const P& prm, int64_t tile) {
  int lo = 0, hi = prm.num_layers - 1;
  while (lo < hi) {
    const int mid = (lo + hi + 1) >> 1;
    if (prm.tile_start[mid] <= tile) lo = mid; else hi = mid - 1;
  }
  return lo;
}

// Runs f(k0, k1) for the layers [0, K) in launch batches of at most kMaxLayers.
template <typename F>
void for_each_layer_batch(int64_t K, F&& f) {
  for (int64_t k0 = 0; k0 < K; k0 += kMaxLayers) f(k0, std::min<int64_t>(K, k0 + kMaxLayers));
}

// Fills `P` with layers [k0, k1) of a call with B samples: fill(record, k) writes layer k's
// record and returns its tiles per sample.  Returns the number of tiles of the launch.
template <typename Layer, typename F>
int64_t fill_layer_table(LayerTable<Layer>& P, int64_t B, int64_t k0, int64_t k1, F&& fill) {
  P = LayerTable<Layer>{};
  P.num_layers = static_cast<int32_t>(k1 - k0);
  P.B = B;
  int64_t tiles = 0;
  for (int64_t k = k0; k < k1; ++k) {
    P.tile_start[k - k0] = tiles;
    tiles += B * fill(P.layer[k - k0], k);
  }
  P.tile_start[k1 - k0] = tiles;
  return tiles;
}

// ---------------------------------------------------------------------------------------------
// Device-buffer table
// ---------------------------------------------------------------------------------------------
class DeviceTable {
 public:
  // Appends `count` records (16-byte aligned, or the type's alignment); returns their byte offset.
  template <typename T>
  size_t add(const T* data, size_t count) {
    const size_t align = alignof(T) < 16 ? 16 : alignof(T);
    const size_t off = (bytes_.size() + align - 1) / align * align;
    bytes_.resize(off + sizeof(T) * count);
    if (count) std::memcpy(bytes_.data() + off, data, sizeof(T) * count);
    return off;
  }
  template <typename T>
  size_t add(const std::vector<T>& records) { return add(records.data(), records.size()); }

  // Ships the table to `device` without blocking the host.  The pinned staging block comes from
  // the caching host allocator, which keeps it alive until the copy has completed on the current
  // stream; the returned buffer must outlive the launches that read it (stream order).
  at::Tensor upload(const at::Device& device) const {
    const int64_t n = static_cast<int64_t>(bytes_.size());
    at::Tensor host = at::empty({n}, at::TensorOptions().dtype(at::kByte).pinned_memory(true));
    std::memcpy(host.mutable_data_ptr(), bytes_.data(), bytes_.size());
    at::Tensor dev = at::empty({n}, at::TensorOptions().dtype(at::kByte).device(device));
    dev.copy_(host, /*non_blocking=*/true);
    return dev;
  }

  // The records added at byte offset `off`, in the uploaded buffer `dev`.
  template <typename T>
  static const T* view(const at::Tensor& dev, size_t off) {
    return reinterpret_cast<const T*>(static_cast<const char*>(dev.const_data_ptr()) + off);
  }

 private:
  std::vector<char> bytes_;
};

}  // namespace cuda
}  // namespace lwkd
