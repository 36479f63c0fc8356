// CUDA kernels of medmtl::multiscale_pool and their host launchers (no torch
// headers). The index math and the per-element activation are the
// __host__ __device__ functions of csrc/core/adaptive_bins.h, which the CPU
// kernels (and their tests) use too.
//
// Forward: one block pools one bin of one (b, c) plane; one launch per (level,
// output size), grid (bins of that size, planes), the block size fitted to the
// largest bin. Max mode reduces (value, position) pairs with the CPU's scan
// rule: the last NaN, else the first position of the maximum.
// Backward: one thread per input element gathers the gradient of every bin
// (of every size) that contains it, in the CPU's summation order: avg adds
// grad / count, max adds grad where the bin's argmax (recomputed by the forward
// kernel into a scratch buffer) is this element. It then applies the ReLU mask
// and the scale, writes grad_x, and each block writes its partial sums of
// grad_y * x and grad_y for its plane; the host sums those (no atomics).
#include "multiscale_pool_kernel.h"
#include "device_common.cuh"

#include <algorithm>

#include "../core/adaptive_bins.h"

namespace medmtl {
namespace cuda {
namespace {

constexpr int kMaxForwardThreads = 256;
constexpr int kBackwardThreads = 256;
// 3 blocks (24 warps) per SM, <= 85 registers: spill-free on sm_80 and sm_90 with
// the 32-bit index math (without a minimum ptxas picked 48 - 64 and spilled).
constexpr int kBackwardBlocksPerSM = 3;
constexpr int64_t kMaxGridX = 2147483647;  // 2^31 - 1
constexpr int64_t kMaxGridY = 65535;
constexpr int64_t kBackwardTargetBlocks = 2048;  // enough blocks to fill any current GPU


template <typename scalar_t>
__device__ __forceinline__ acc_type<scalar_t> param_or(const scalar_t* p, int64_t c,
                                                       acc_type<scalar_t> fill) {
  return p != nullptr ? to_acc(p[c]) : fill;
}

// ---------------------------------------------------------------------------
// Block reductions. blockDim.x is a multiple of 32 (at most 1024) and every
// thread of the block calls them; the result is valid in thread 0.



// Merges the candidate (value, index) into the running (v, i); index -1 means
// "no element". Equivalent to scanning the positions in increasing order with
// core::max_pool_takes starting from the first one: any NaN -> the last NaN,
// else the maximum at its smallest position.
template <typename acc_t>
__device__ __forceinline__ void argmax_merge(acc_t& v, int64_t& i, acc_t cand_v, int64_t cand_i) {
  if (cand_i < 0) return;
  bool take;
  if (i < 0) {
    take = true;
  } else {
    const bool nan = v != v, cand_nan = cand_v != cand_v;
    if (nan || cand_nan)
      take = cand_nan && (!nan || cand_i > i);
    else
      take = cand_v > v || (cand_v == v && cand_i < i);
  }
  if (take) {
    v = cand_v;
    i = cand_i;
  }
}

template <typename acc_t>
__device__ __forceinline__ void warp_argmax(acc_t& v, int64_t& i) {
  for (int offset = kWarpSize / 2; offset > 0; offset >>= 1) {
    const acc_t other_v = __shfl_down_sync(kFullMask, v, offset);
    const int64_t other_i = __shfl_down_sync(kFullMask, i, offset);
    argmax_merge(v, i, other_v, other_i);
  }
}

template <typename acc_t>
__device__ void block_argmax(acc_t& v, int64_t& i) {
  __shared__ acc_t partial_v[kWarpSize];
  __shared__ int64_t partial_i[kWarpSize];
  const int lane = threadIdx.x % kWarpSize, warp = threadIdx.x / kWarpSize;
  const int warps = blockDim.x / kWarpSize;
  warp_argmax(v, i);
  if (lane == 0) {
    partial_v[warp] = v;
    partial_i[warp] = i;
  }
  __syncthreads();
  if (warp == 0) {
    v = lane < warps ? partial_v[lane] : acc_t(0);
    i = lane < warps ? partial_i[lane] : int64_t(-1);
    warp_argmax(v, i);
  }
  __syncthreads();
}

// ---------------------------------------------------------------------------
// Forward: block (bin, plane) of one output size s of one level. Writes the
// pooled value to out (if not null) at
//   plane's row b * out_row + out_col + c * bins + bin
// and, in max mode, the plane position of the maximum to argmax (if not null)
// at plane * argmax_row + argmax_col + bin.
template <typename scalar_t, bool kMax>
__global__ void __launch_bounds__(kMaxForwardThreads) multiscale_pool_forward_kernel(
    const scalar_t* __restrict__ x, const scalar_t* __restrict__ scale,
    const scalar_t* __restrict__ shift, bool relu, int64_t planes, int64_t channels,
    int64_t depth, int64_t height, int64_t width, int64_t s, int64_t out_depth,
    scalar_t* __restrict__ out, int64_t out_row, int64_t out_col, int64_t* __restrict__ argmax,
    int64_t argmax_row, int64_t argmax_col) {
  using acc_t = acc_type<scalar_t>;
  const int64_t bins = out_depth * s * s, plane_size = depth * height * width;
  for (int64_t p = blockIdx.y; p < planes; p += gridDim.y) {
    const int64_t c = p % channels, b = p / channels;
    const acc_t sc = param_or(scale, c, acc_t(1)), sh = param_or(shift, c, acc_t(0));
    const scalar_t* xp = x + p * plane_size;
    for (int64_t bin = blockIdx.x; bin < bins; bin += gridDim.x) {
      const int64_t bw = bin % s, bh = (bin / s) % s, bd = bin / (s * s);
      const int64_t d0 = core::adaptive_bin_start(bd, depth, out_depth);
      const int64_t d1 = core::adaptive_bin_end(bd, depth, out_depth);
      const int64_t h0 = core::adaptive_bin_start(bh, height, s);
      const int64_t h1 = core::adaptive_bin_end(bh, height, s);
      const int64_t w0 = core::adaptive_bin_start(bw, width, s);
      const int64_t w1 = core::adaptive_bin_end(bw, width, s);
      const int64_t nh = h1 - h0, nw = w1 - w0, count = (d1 - d0) * nh * nw;
      // Element i of the bin, in row-major order (so positions increase with i).
      auto position = [&](int64_t i) {
        const int64_t dw = i % nw, r = i / nw;
        return ((d0 + r / nh) * height + h0 + r % nh) * width + w0 + dw;
      };
      if constexpr (!kMax) {
        acc_t sum = 0;
        for (int64_t i = threadIdx.x; i < count; i += blockDim.x)
          sum += core::affine_activation<acc_t>(to_acc(xp[position(i)]), sc, sh, relu);
        sum = block_sum(sum);
        if (threadIdx.x == 0 && out != nullptr)
          out[b * out_row + out_col + c * bins + bin] = FromAcc<scalar_t>::cast(sum / acc_t(count));
      } else {
        acc_t best = 0;
        int64_t best_pos = -1;
        for (int64_t i = threadIdx.x; i < count; i += blockDim.x) {
          const int64_t pos = position(i);
          const acc_t t = core::affine_activation<acc_t>(to_acc(xp[pos]), sc, sh, relu);
          if (best_pos < 0 || core::max_pool_takes(t, best)) {
            best = t;
            best_pos = pos;
          }
        }
        block_argmax(best, best_pos);
        if (threadIdx.x == 0) {
          if (out != nullptr) out[b * out_row + out_col + c * bins + bin] = FromAcc<scalar_t>::cast(best);
          if (argmax != nullptr) argmax[p * argmax_row + argmax_col + bin] = best_pos;
        }
      }
    }
  }
}

// ---------------------------------------------------------------------------
// Backward: block (chunk, plane); the threads of the gridDim.x chunks of a plane
// stride over its elements.

// Output sizes of one backward launch, with their bin offsets within a channel.
struct SizeList {
  int64_t count = 0;
  int64_t s[kMaxSizesPerLaunch] = {};
  int64_t offset[kMaxSizesPerLaunch] = {};
};

// grad_in (optional) holds the pooled gradient of earlier sizes of the element;
// with grad_scratch set, the kernel stores the pooled gradient there and stops,
// else it finishes: grad_x and the partial sums partial[plane * gridDim.x + chunk].
template <typename scalar_t, bool kMax>
__global__ void __launch_bounds__(kBackwardThreads, kBackwardBlocksPerSM) multiscale_pool_backward_kernel(
    const scalar_t* __restrict__ grad_output, const scalar_t* __restrict__ x,
    const scalar_t* __restrict__ scale, const scalar_t* __restrict__ shift, bool relu,
    int64_t planes, int64_t channels, int64_t depth, int64_t height, int64_t width, bool three_d,
    SizeList sizes, int64_t bins_per_channel, int64_t out_row, int64_t level_col,
    const int64_t* __restrict__ argmax, const acc_type<scalar_t>* grad_in,
    acc_type<scalar_t>* grad_scratch, scalar_t* __restrict__ grad_x,
    acc_type<scalar_t>* __restrict__ grad_scale_partial,
    acc_type<scalar_t>* __restrict__ grad_shift_partial) {
  using acc_t = acc_type<scalar_t>;
  // 32-bit index math (the wrapper checked B * C, the plane size and (extent + 1) *
  // (output size + 1) against 2^31); 64-bit offsets.
  const int L0 = static_cast<int>(depth), L1 = static_cast<int>(height), L2 = static_cast<int>(width);
  const int plane_size = L0 * L1 * L2, nc = static_cast<int>(channels);
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t p = blockIdx.y; p < planes; p += gridDim.y) {
    const int c = static_cast<int>(p) % nc, b = static_cast<int>(p) / nc;
    const acc_t sc = param_or(scale, c, acc_t(1)), sh = param_or(shift, c, acc_t(0));
    const scalar_t* go = grad_output + b * out_row + level_col;
    acc_t sum_scale = 0, sum_shift = 0;
    for (int64_t e64 = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e64 < plane_size;
         e64 += stride) {
      const int e = static_cast<int>(e64);
      const int64_t index = p * plane_size + e;
      const int w = e % L2, r = e / L2, h = r % L1, d = r / L1;
      acc_t gt = grad_in != nullptr ? grad_in[index] : acc_t(0);
      for (int k = 0; k < sizes.count; ++k) {
        const int s = static_cast<int>(sizes.s[k]), od = three_d ? s : 1;
        const int64_t bins = static_cast<int64_t>(od) * s * s;
        const scalar_t* gk = go + channels * sizes.offset[k] + c * bins;
        const int bd_last = core::last_bin_containing(d, L0, od);
        const int bh_last = core::last_bin_containing(h, L1, s);
        const int bw_first = core::first_bin_containing(w, L2, s);
        const int bw_last = core::last_bin_containing(w, L2, s);
        for (int bd = core::first_bin_containing(d, L0, od); bd <= bd_last; ++bd) {
          const int nd = core::adaptive_bin_end(bd, L0, od) - core::adaptive_bin_start(bd, L0, od);
          for (int bh = core::first_bin_containing(h, L1, s); bh <= bh_last; ++bh) {
            const int nh = core::adaptive_bin_end(bh, L1, s) - core::adaptive_bin_start(bh, L1, s);
            const int row = (bd * s + bh) * s;  // < bins
            for (int bw = bw_first; bw <= bw_last; ++bw) {
              if constexpr (kMax) {
                if (argmax[p * bins_per_channel + sizes.offset[k] + row + bw] == e)
                  gt += to_acc(gk[row + bw]);
              } else {
                const int nw = core::adaptive_bin_end(bw, L2, s) - core::adaptive_bin_start(bw, L2, s);
                gt += to_acc(gk[row + bw]) / acc_t(nd * nh * nw);
              }
            }
          }
        }
      }
      if (grad_scratch != nullptr) {
        grad_scratch[index] = gt;
        continue;
      }
      const acc_t xv = to_acc(x[index]);
      const acc_t gy = core::activation_backward<acc_t>(gt, xv * sc + sh, relu);
      grad_x[index] = FromAcc<scalar_t>::cast(gy * sc);
      sum_scale += gy * xv;
      sum_shift += gy;
    }
    if (grad_scratch == nullptr) {  // uniform over the grid
      sum_scale = block_sum(sum_scale);
      sum_shift = block_sum(sum_shift);
      if (threadIdx.x == 0) {
        grad_scale_partial[p * gridDim.x + blockIdx.x] = sum_scale;
        grad_shift_partial[p * gridDim.x + blockIdx.x] = sum_shift;
      }
    }
  }
}

// ---------------------------------------------------------------------------
// Host side.

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

int64_t planes_of(const MultiscalePoolLevel& level) { return level.batch * level.channels; }

int64_t plane_size_of(const MultiscalePoolLevel& level) {
  return level.depth * level.height * level.width;
}

int64_t out_depth_of(const MultiscalePoolLevel& level, int64_t s) {
  return level.spatial_dims == 3 ? s : 1;
}

// Longest bin along an axis of length `in` split into `out` bins.
int64_t max_bin_extent(int64_t in, int64_t out) {
  return std::min(in, ceil_div(in, out) + 1);
}

// Threads for a bin of up to `count` elements: a power of two in [32, 256].
int forward_threads(int64_t count) {
  int threads = kWarpSize;
  while (threads < kMaxForwardThreads && threads < count) threads *= 2;
  return threads;
}

// Pools one level to output size k: values into out (if not null), argmax
// positions into argmax (if not null, max mode) at [plane][bins_per_channel].
template <typename scalar_t>
cudaError_t launch_forward_size(const MultiscalePoolLevel& level, int64_t k, const scalar_t* x,
                                const scalar_t* scale, const scalar_t* shift, bool relu,
                                bool is_max, scalar_t* out, int64_t* argmax, cudaStream_t stream) {
  const int64_t planes = planes_of(level);
  const int64_t s = level.sizes[k], od = out_depth_of(level, s), bins = od * s * s;
  if (planes == 0 || bins == 0) return cudaSuccess;
  const int64_t count = max_bin_extent(level.depth, od) * max_bin_extent(level.height, s) *
                        max_bin_extent(level.width, s);
  const dim3 grid(static_cast<unsigned>(std::min(bins, kMaxGridX)),
                  static_cast<unsigned>(std::min(planes, kMaxGridY)));
  const dim3 block(forward_threads(count));
  const int64_t out_col = level.level_col + level.channels * level.size_offset[k];
  if (is_max) {
    multiscale_pool_forward_kernel<scalar_t, true><<<grid, block, 0, stream>>>(
        x, scale, shift, relu, planes, level.channels, level.depth, level.height, level.width, s,
        od, out, level.out_row, out_col, argmax, level.bins_per_channel, level.size_offset[k]);
  } else {
    multiscale_pool_forward_kernel<scalar_t, false><<<grid, block, 0, stream>>>(
        x, scale, shift, relu, planes, level.channels, level.depth, level.height, level.width, s,
        od, out, level.out_row, out_col, nullptr, 0, 0);
  }
  return cudaGetLastError();
}

}  // namespace

MultiscalePoolBackwardWorkspace multiscale_pool_backward_workspace(const MultiscalePoolLevel& level,
                                                                   bool is_max) {
  MultiscalePoolBackwardWorkspace ws;
  const int64_t planes = planes_of(level), plane_size = plane_size_of(level);
  // Enough blocks in all, but no more than one per kBackwardThreads elements.
  const int64_t blocks_per_plane = std::max<int64_t>(1, ceil_div(plane_size, kBackwardThreads));
  const int64_t wanted = ceil_div(kBackwardTargetBlocks, std::max<int64_t>(planes, 1));
  ws.partials_per_plane = std::max<int64_t>(1, std::min({wanted, blocks_per_plane, kMaxGridX}));
  ws.argmax_elements = is_max ? planes * level.bins_per_channel : 0;
  ws.grad_elements = level.num_sizes > kMaxSizesPerLaunch ? planes * plane_size : 0;
  return ws;
}

template <typename scalar_t>
cudaError_t launch_multiscale_pool_forward(const MultiscalePoolLevel& level, const scalar_t* x,
                                           const scalar_t* scale, const scalar_t* shift, bool relu,
                                           bool is_max, scalar_t* out, cudaStream_t stream) {
  for (int64_t k = 0; k < level.num_sizes; ++k) {
    const cudaError_t err =
        launch_forward_size(level, k, x, scale, shift, relu, is_max, out, nullptr, stream);
    if (err != cudaSuccess) return err;
  }
  return cudaSuccess;
}

template <typename scalar_t>
cudaError_t launch_multiscale_pool_backward(const MultiscalePoolLevel& level,
                                            const scalar_t* grad_output, const scalar_t* x,
                                            const scalar_t* scale, const scalar_t* shift,
                                            bool relu, bool is_max, scalar_t* grad_x,
                                            acc_type<scalar_t>* grad_scale_partial,
                                            acc_type<scalar_t>* grad_shift_partial,
                                            int64_t* argmax, acc_type<scalar_t>* grad_scratch,
                                            cudaStream_t stream) {
  using acc_t = acc_type<scalar_t>;
  const int64_t planes = planes_of(level);
  if (planes == 0) return cudaSuccess;
  const MultiscalePoolBackwardWorkspace ws = multiscale_pool_backward_workspace(level, is_max);
  if (is_max) {  // the maxima's positions, as the forward finds them
    for (int64_t k = 0; k < level.num_sizes; ++k) {
      const cudaError_t err = launch_forward_size<scalar_t>(level, k, x, scale, shift, relu, true,
                                                            nullptr, argmax, stream);
      if (err != cudaSuccess) return err;
    }
  }
  const dim3 grid(static_cast<unsigned>(ws.partials_per_plane),
                  static_cast<unsigned>(std::min(planes, kMaxGridY)));
  const dim3 block(kBackwardThreads);
  const bool three_d = level.spatial_dims == 3;
  for (int64_t first = 0; first < level.num_sizes; first += kMaxSizesPerLaunch) {
    SizeList sizes;
    sizes.count = std::min(kMaxSizesPerLaunch, level.num_sizes - first);
    for (int64_t j = 0; j < sizes.count; ++j) {
      sizes.s[j] = level.sizes[first + j];
      sizes.offset[j] = level.size_offset[first + j];
    }
    const bool last = first + sizes.count == level.num_sizes;
    const acc_t* grad_in = first > 0 ? grad_scratch : nullptr;
    acc_t* grad_store = last ? nullptr : grad_scratch;
    if (is_max) {
      multiscale_pool_backward_kernel<scalar_t, true><<<grid, block, 0, stream>>>(
          grad_output, x, scale, shift, relu, planes, level.channels, level.depth, level.height,
          level.width, three_d, sizes, level.bins_per_channel, level.out_row, level.level_col,
          argmax, grad_in, grad_store, grad_x, grad_scale_partial, grad_shift_partial);
    } else {
      multiscale_pool_backward_kernel<scalar_t, false><<<grid, block, 0, stream>>>(
          grad_output, x, scale, shift, relu, planes, level.channels, level.depth, level.height,
          level.width, three_d, sizes, level.bins_per_channel, level.out_row, level.level_col,
          nullptr, grad_in, grad_store, grad_x, grad_scale_partial, grad_shift_partial);
    }
    const cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  return cudaSuccess;
}

#define MEDMTL_INSTANTIATE_MULTISCALE_POOL(T)                                                   \
  template cudaError_t launch_multiscale_pool_forward<T>(                                       \
      const MultiscalePoolLevel&, const T*, const T*, const T*, bool, bool, T*, cudaStream_t);  \
  template cudaError_t launch_multiscale_pool_backward<T>(                                      \
      const MultiscalePoolLevel&, const T*, const T*, const T*, const T*, bool, bool, T*,       \
      acc_type<T>*, acc_type<T>*, int64_t*, acc_type<T>*, cudaStream_t);

MEDMTL_INSTANTIATE_MULTISCALE_POOL(float)
MEDMTL_INSTANTIATE_MULTISCALE_POOL(double)
MEDMTL_INSTANTIATE_MULTISCALE_POOL(__half)
MEDMTL_INSTANTIATE_MULTISCALE_POOL(__nv_bfloat16)

#undef MEDMTL_INSTANTIATE_MULTISCALE_POOL

}  // namespace cuda
}  // namespace medmtl
