// CUDA kernels of medmtl::spatial_attention and their host launchers (no torch
// headers). The window bounds (which taps of the KxK window read inside the
// map) are the __host__ __device__ functions of csrc/core/dilated_taps.h.
//
// Forward, three launches:
//  1. channel_pool_kernel: one pass over x. A block takes kPoolPixels
//     consecutive pixels of one image (a warp's worth: coalesced loads) and
//     kPoolSlices channel slices (slice s takes channels s, s + kPoolSlices,
//     ...); the slices' sums and (max, first maximal channel) are merged in
//     shared memory -> pooled (B, 2, H, W) (mean, max; fp32, double for
//     double) and, for the backward, argmax and sum_c grad_output * x.
//  2. gate_kernel: one thread per pixel, the KxK convolution of the 2-channel
//     pooled map (taps outside the map skipped by their bounds, not tested
//     one by one) and the sigmoid -> gate (B, H, W); in the backward also
//     grad_logit = (sum_c grad_output * x) * gate * (1 - gate).
//  3. gate_multiply_kernel: out = x * gate, one thread per element.
// Backward, after 1 and 2 (recomputed):
//  4. grad_pooled_kernel: one thread per pixel, the transposed KxK convolution
//     of grad_logit -> grad_pooled (B, 2, H, W).
//  5. grad_x_kernel: one thread per element, grad_output * gate +
//     grad_mean / C + (c == argmax) * grad_max.
//  6. grad_weight_kernel: block (tap, slice): the sum over one slice of the
//     tap's (batch, in-map rectangle) of grad_logit * shifted pooled, reduced
//     in the block; one partial per block, summed by the caller (no atomics:
//     deterministic).
#include "spatial_attention_kernel.h"
#include "device_common.cuh"

#include <algorithm>
#include <cmath>

#include "../core/dilated_taps.h"

namespace medmtl {
namespace cuda {
namespace spatial_attention_detail {
namespace {

constexpr int kPoolPixels = 32;  // pixels per channel-pool block (one per lane)
constexpr int kPoolSlices = 8;   // channel slices per channel-pool block
constexpr int kPoolThreads = kPoolPixels * kPoolSlices;
constexpr int kPixelThreads = 256;    // per-pixel and per-element kernels
constexpr int kWeightThreads = 256;   // grad_weight reduction blocks
constexpr int64_t kMaxGridX = 2147483647;  // 2^31 - 1
constexpr int64_t kMaxGridY = 65535;
constexpr int64_t kTargetBlocks = 2048;  // enough blocks to fill any current GPU

static_assert(kPoolPixels % kWarpSize == 0 && kPoolThreads <= 1024, "channel-pool block size");
static_assert(kPixelThreads % kWarpSize == 0 && kPixelThreads <= 1024, "pixel block size");
static_assert(kWeightThreads % kWarpSize == 0 && kWeightThreads <= 1024, "grad_weight block size");


__device__ __forceinline__ float sigmoid(float s) { return 1.0f / (1.0f + expf(-s)); }
__device__ __forceinline__ double sigmoid(double s) { return 1.0 / (1.0 + exp(-s)); }

__host__ __device__ __forceinline__ int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }
__host__ __device__ __forceinline__ int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// torch.max(dim=1) over channels: the first NaN, else the first maximal
// channel. Merges candidate (v, c) into the running (best, best_c); best_c < 0
// means none yet. Channel order does not matter: the smaller index wins ties.
template <typename acc_t>
__device__ __forceinline__ void channel_max_merge(acc_t& best, int& best_c, acc_t v, int c) {
  if (c < 0) return;
  bool take;
  if (best_c < 0) {
    take = true;
  } else {
    const bool nan = best != best, cand_nan = v != v;
    if (nan || cand_nan)
      take = cand_nan && (!nan || c < best_c);
    else
      take = v > best || (v == best && c < best_c);
  }
  if (take) {
    best = v;
    best_c = c;
  }
}


// ---------------------------------------------------------------------------
// Kernels.

// pooled[b, 0 / 1, p] = mean / max over channels of x[b, :, p]; argmax (if not
// null) the first maximal channel; grad_gate (if grad_output is not null)
// sum_c grad_output * x.
template <typename scalar_t>
__global__ void __launch_bounds__(kPoolThreads) channel_pool_kernel(
    const scalar_t* __restrict__ x, const scalar_t* __restrict__ grad_output, int64_t batch,
    int64_t channels, int64_t plane, acc_type<scalar_t>* __restrict__ pooled,
    int32_t* __restrict__ argmax, acc_type<scalar_t>* __restrict__ grad_gate) {
  using acc_t = acc_type<scalar_t>;
  __shared__ acc_t sum_s[kPoolSlices][kPoolPixels];
  __shared__ acc_t max_s[kPoolSlices][kPoolPixels];
  __shared__ acc_t dot_s[kPoolSlices][kPoolPixels];
  __shared__ int arg_s[kPoolSlices][kPoolPixels];
  const int lane = threadIdx.x % kPoolPixels, slice = threadIdx.x / kPoolPixels;
  // 32-bit index math (the wrapper checked batch * plane < 2^31), 64-bit offsets.
  const int pixel_blocks = (static_cast<int>(plane) + kPoolPixels - 1) / kPoolPixels;
  for (int64_t blk64 = blockIdx.x; blk64 < batch * pixel_blocks; blk64 += gridDim.x) {
    const int blk = static_cast<int>(blk64);
    const int b = blk / pixel_blocks, q = blk % pixel_blocks * kPoolPixels + lane;
    const bool inside = q < plane;
    acc_t sum = 0, best = 0, dot = 0;
    int best_c = -1;
    if (inside) {
      for (int64_t c = slice; c < channels; c += kPoolSlices) {
        const int64_t index = (static_cast<int64_t>(b) * channels + c) * plane + q;
        const acc_t v = to_acc(x[index]);
        sum += v;
        channel_max_merge(best, best_c, v, static_cast<int>(c));
        if (grad_output != nullptr) dot += to_acc(grad_output[index]) * v;
      }
    }
    sum_s[slice][lane] = sum;
    max_s[slice][lane] = best;
    arg_s[slice][lane] = best_c;
    dot_s[slice][lane] = dot;
    __syncthreads();
    if (slice == 0 && inside) {
      for (int s = 1; s < kPoolSlices; ++s) {
        sum += sum_s[s][lane];
        dot += dot_s[s][lane];
        channel_max_merge(best, best_c, max_s[s][lane], arg_s[s][lane]);
      }
      const int64_t pixel = static_cast<int64_t>(b) * plane + q;
      pooled[pixel + b * plane] = sum / acc_t(channels);  // (b * 2) * plane + q
      pooled[pixel + (b + 1) * plane] = best;
      if (argmax != nullptr) argmax[pixel] = best_c;
      if (grad_output != nullptr) grad_gate[pixel] = dot;
    }
    __syncthreads();  // the shared arrays are rewritten by the next pixel block
  }
}

// gate[b, p] = sigmoid(sum_{j, ky, kx} weight[j, ky, kx] * pooled[b, j, p + (ky - r, kx - r)]),
// r = K / 2. With grad_logit set, it holds sum_c grad_output * x on entry and
// the gradient of the logit on exit.
template <typename scalar_t>
__global__ void __launch_bounds__(kPixelThreads) gate_kernel(
    const acc_type<scalar_t>* __restrict__ pooled, const scalar_t* __restrict__ weight, int64_t batch,
    int64_t height, int64_t width, int64_t kernel_size, acc_type<scalar_t>* __restrict__ gate,
    acc_type<scalar_t>* __restrict__ grad_logit) {
  using acc_t = acc_type<scalar_t>;
  const int64_t plane = height * width, radius = kernel_size / 2;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t k = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; k < batch * plane; k += stride) {
    const int64_t b = k / plane, q = k % plane, h = q / width, w = q % width;
    const int64_t ky0 = core::window_tap_begin(h, radius), ky1 = core::window_tap_end(h, radius, kernel_size, height);
    const int64_t kx0 = core::window_tap_begin(w, radius), kx1 = core::window_tap_end(w, radius, kernel_size, width);
    acc_t s = 0;
    for (int64_t j = 0; j < 2; ++j) {
      const acc_t* src = pooled + (b * 2 + j) * plane;
      const scalar_t* wj = weight + j * kernel_size * kernel_size;
      for (int64_t ky = ky0; ky < ky1; ++ky) {
        const int64_t row = (h + ky - radius) * width + w - radius;
        for (int64_t kx = kx0; kx < kx1; ++kx) s += to_acc(wj[ky * kernel_size + kx]) * src[row + kx];
      }
    }
    const acc_t g = sigmoid(s);
    gate[k] = g;
    if (grad_logit != nullptr) grad_logit[k] = grad_logit[k] * g * (acc_t(1) - g);
  }
}

// out = x * gate (broadcast over channels).
template <typename scalar_t>
__global__ void __launch_bounds__(kPixelThreads) gate_multiply_kernel(
    const scalar_t* __restrict__ x, const acc_type<scalar_t>* __restrict__ gate, int64_t batch,
    int64_t channels, int64_t plane, scalar_t* __restrict__ out) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < batch * channels * plane;
       i += stride)
    out[i] = FromAcc<scalar_t>::cast(to_acc(x[i]) * gate[i / (channels * plane) * plane + i % plane]);
}

// grad_pooled[b, j, p] = sum_{ky, kx} weight[j, ky, kx] * grad_logit[b, p - (ky - r, kx - r)]:
// the transposed window, walked as the window of the mirrored tap K - 1 - k.
template <typename scalar_t>
__global__ void __launch_bounds__(kPixelThreads) grad_pooled_kernel(
    const acc_type<scalar_t>* __restrict__ grad_logit, const scalar_t* __restrict__ weight, int64_t batch,
    int64_t height, int64_t width, int64_t kernel_size, acc_type<scalar_t>* __restrict__ grad_pooled) {
  using acc_t = acc_type<scalar_t>;
  const int64_t plane = height * width, radius = kernel_size / 2, last = kernel_size - 1;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t k = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; k < batch * plane; k += stride) {
    const int64_t b = k / plane, q = k % plane, h = q / width, w = q % width;
    const int64_t my0 = core::window_tap_begin(h, radius), my1 = core::window_tap_end(h, radius, kernel_size, height);
    const int64_t mx0 = core::window_tap_begin(w, radius), mx1 = core::window_tap_end(w, radius, kernel_size, width);
    const acc_t* src = grad_logit + b * plane;
    acc_t g[2] = {0, 0};
    for (int64_t my = my0; my < my1; ++my) {
      const int64_t row = (h + my - radius) * width + w - radius;
      for (int64_t mx = mx0; mx < mx1; ++mx) {
        const acc_t v = src[row + mx];
        const int64_t tap = (last - my) * kernel_size + (last - mx);
        g[0] += to_acc(weight[tap]) * v;
        g[1] += to_acc(weight[kernel_size * kernel_size + tap]) * v;
      }
    }
    grad_pooled[(b * 2) * plane + q] = g[0];
    grad_pooled[(b * 2 + 1) * plane + q] = g[1];
  }
}

// grad_x = grad_output * gate + grad_mean / C + (c == argmax) * grad_max.
template <typename scalar_t>
__global__ void __launch_bounds__(kPixelThreads) grad_x_kernel(
    const scalar_t* __restrict__ grad_output, const acc_type<scalar_t>* __restrict__ gate,
    const acc_type<scalar_t>* __restrict__ grad_pooled, const int32_t* __restrict__ argmax, int64_t batch,
    int64_t channels, int64_t plane, scalar_t* __restrict__ grad_x) {
  using acc_t = acc_type<scalar_t>;
  // 32-bit index math (the wrapper checked x.numel() < 2^31).
  const int n = static_cast<int>(batch * channels * plane), hw = static_cast<int>(plane);
  const int nc = static_cast<int>(channels);
  const acc_t inv_channels = acc_t(1) / acc_t(channels);  // float64's division is a call: one, here
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i64 = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i64 < n; i64 += stride) {
    const int i = static_cast<int>(i64);
    const int q = i % hw, bc = i / hw, c = bc % nc, b = bc / nc;
    const int pixel = b * hw + q;
    acc_t v = to_acc(grad_output[i]) * gate[pixel] + grad_pooled[pixel + b * hw] * inv_channels;
    if (argmax[pixel] == c) v += grad_pooled[pixel + (b + 1) * hw];
    grad_x[i] = FromAcc<scalar_t>::cast(v);
  }
}

// partial[tap * gridDim.y + part] = sum over slice `part` of the (batch,
// in-map rectangle) of tap (j, ky, kx) of grad_logit[b, p] * pooled[b, j, p + shift].
template <typename scalar_t>
__global__ void __launch_bounds__(kWeightThreads) grad_weight_kernel(
    const acc_type<scalar_t>* __restrict__ grad_logit, const acc_type<scalar_t>* __restrict__ pooled,
    int64_t batch, int64_t height, int64_t width, int64_t kernel_size,
    acc_type<scalar_t>* __restrict__ partial) {
  using acc_t = acc_type<scalar_t>;
  const int64_t plane = height * width, radius = kernel_size / 2, taps = 2 * kernel_size * kernel_size;
  const int64_t partials = gridDim.y;
  for (int64_t t = blockIdx.x; t < taps; t += gridDim.x) {
    const int64_t j = t / (kernel_size * kernel_size), ky = t / kernel_size % kernel_size, kx = t % kernel_size;
    const int64_t dy = ky - radius, dx = kx - radius;
    const int64_t r0 = core::tap_output_begin(dy, height), c0 = core::tap_output_begin(dx, width);
    const int64_t cols = core::tap_output_end(dx, width) - c0;
    const int64_t rect = (core::tap_output_end(dy, height) - r0) * cols;
    const int64_t total = batch * rect;
    const int64_t part = blockIdx.y;
    const int64_t begin = total * part / partials, end = total * (part + 1) / partials;
    acc_t sum = 0;
    for (int64_t k = begin + threadIdx.x; k < end; k += blockDim.x) {
      const int64_t b = k / rect, r = k % rect, h = r0 + r / cols, w = c0 + r % cols;
      sum += grad_logit[b * plane + h * width + w] * pooled[(b * 2 + j) * plane + (h + dy) * width + w + dx];
    }
    sum = block_sum(sum);
    if (threadIdx.x == 0) partial[t * partials + part] = sum;
  }
}

// ---------------------------------------------------------------------------
// Host side.

dim3 grid_for(int64_t work, int threads) {
  return dim3(static_cast<unsigned>(min64(std::max<int64_t>(1, ceil_div(work, threads)), kMaxGridX)));
}

SpatialAttentionWorkspace workspace(const SpatialAttentionDims& dims) {
  SpatialAttentionWorkspace ws;
  const int64_t pixels = dims.batch * dims.height * dims.width;
  ws.pooled_elements = 2 * pixels;
  ws.gate_elements = pixels;
  ws.argmax_elements = pixels;
  ws.grad_logit_elements = pixels;
  ws.grad_pooled_elements = 2 * pixels;
  const int64_t taps = 2 * dims.kernel_size * dims.kernel_size;
  const int64_t wanted = ceil_div(kTargetBlocks, taps);
  ws.weight_partials =
      std::max<int64_t>(1, std::min({wanted, ceil_div(pixels, 4 * kWeightThreads), kMaxGridY}));
  return ws;
}

// The channel pool and the gate, for the forward (grad_output null) and the backward.
template <typename scalar_t>
cudaError_t pool_and_gate(const SpatialAttentionDims& d, const scalar_t* x, const scalar_t* grad_output,
                          const scalar_t* weight, acc_type<scalar_t>* pooled, int32_t* argmax,
                          acc_type<scalar_t>* gate, acc_type<scalar_t>* grad_logit, cudaStream_t stream) {
  const int64_t plane = d.height * d.width;
  const dim3 pool_grid(static_cast<unsigned>(min64(d.batch * ceil_div(plane, kPoolPixels), kMaxGridX)));
  channel_pool_kernel<scalar_t><<<pool_grid, kPoolThreads, 0, stream>>>(
      x, grad_output, d.batch, d.channels, plane, pooled, argmax, grad_logit);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  gate_kernel<scalar_t><<<grid_for(d.batch * plane, kPixelThreads), kPixelThreads, 0, stream>>>(
      pooled, weight, d.batch, d.height, d.width, d.kernel_size, gate, grad_logit);
  return cudaGetLastError();
}

template <typename scalar_t>
cudaError_t forward(const SpatialAttentionDims& d, const scalar_t* x, const scalar_t* weight, scalar_t* out,
                    acc_type<scalar_t>* pooled, acc_type<scalar_t>* gate, cudaStream_t stream) {
  if (d.batch == 0) return cudaSuccess;
  cudaError_t err = pool_and_gate<scalar_t>(d, x, nullptr, weight, pooled, nullptr, gate, nullptr, stream);
  if (err != cudaSuccess) return err;
  const int64_t plane = d.height * d.width;
  gate_multiply_kernel<scalar_t><<<grid_for(d.batch * d.channels * plane, kPixelThreads), kPixelThreads, 0,
                                   stream>>>(x, gate, d.batch, d.channels, plane, out);
  return cudaGetLastError();
}

template <typename scalar_t>
cudaError_t backward(const SpatialAttentionDims& d, const scalar_t* grad_output, const scalar_t* x,
                     const scalar_t* weight, scalar_t* grad_x, acc_type<scalar_t>* grad_weight_partial,
                     acc_type<scalar_t>* pooled, int32_t* argmax, acc_type<scalar_t>* gate,
                     acc_type<scalar_t>* grad_logit, acc_type<scalar_t>* grad_pooled, cudaStream_t stream) {
  const SpatialAttentionWorkspace ws = workspace(d);
  const int64_t plane = d.height * d.width, taps = 2 * d.kernel_size * d.kernel_size;
  if (d.batch > 0) {
    cudaError_t err =
        pool_and_gate<scalar_t>(d, x, grad_output, weight, pooled, argmax, gate, grad_logit, stream);
    if (err != cudaSuccess) return err;
    grad_pooled_kernel<scalar_t><<<grid_for(d.batch * plane, kPixelThreads), kPixelThreads, 0, stream>>>(
        grad_logit, weight, d.batch, d.height, d.width, d.kernel_size, grad_pooled);
    err = cudaGetLastError();
    if (err != cudaSuccess) return err;
    grad_x_kernel<scalar_t><<<grid_for(d.batch * d.channels * plane, kPixelThreads), kPixelThreads, 0,
                              stream>>>(grad_output, gate, grad_pooled, argmax, d.batch, d.channels, plane,
                                        grad_x);
    err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  // Every partial is written (zeros for an empty batch).
  const dim3 grid(static_cast<unsigned>(min64(taps, kMaxGridX)), static_cast<unsigned>(ws.weight_partials));
  grad_weight_kernel<scalar_t><<<grid, kWeightThreads, 0, stream>>>(grad_logit, pooled, d.batch, d.height,
                                                                     d.width, d.kernel_size, grad_weight_partial);
  return cudaGetLastError();
}

}  // namespace
}  // namespace spatial_attention_detail

SpatialAttentionWorkspace spatial_attention_workspace(const SpatialAttentionDims& dims) {
  return spatial_attention_detail::workspace(dims);
}

template <typename scalar_t>
cudaError_t launch_spatial_attention_forward(const SpatialAttentionDims& dims, const scalar_t* x,
                                             const scalar_t* weight, scalar_t* out,
                                             acc_type<scalar_t>* pooled, acc_type<scalar_t>* gate,
                                             cudaStream_t stream) {
  return spatial_attention_detail::forward(dims, x, weight, out, pooled, gate, stream);
}

template <typename scalar_t>
cudaError_t launch_spatial_attention_backward(
    const SpatialAttentionDims& dims, const scalar_t* grad_output, const scalar_t* x,
    const scalar_t* weight, scalar_t* grad_x, acc_type<scalar_t>* grad_weight_partial,
    acc_type<scalar_t>* pooled, int32_t* argmax, acc_type<scalar_t>* gate,
    acc_type<scalar_t>* grad_logit, acc_type<scalar_t>* grad_pooled, cudaStream_t stream) {
  return spatial_attention_detail::backward(dims, grad_output, x, weight, grad_x, grad_weight_partial, pooled,
                                            argmax, gate, grad_logit, grad_pooled, stream);
}

#define MEDMTL_INSTANTIATE_SPATIAL_ATTENTION(T)                                                     \
  template cudaError_t launch_spatial_attention_forward<T>(                                         \
      const SpatialAttentionDims&, const T*, const T*, T*, acc_type<T>*, acc_type<T>*, cudaStream_t); \
  template cudaError_t launch_spatial_attention_backward<T>(                                        \
      const SpatialAttentionDims&, const T*, const T*, const T*, T*, acc_type<T>*, acc_type<T>*,     \
      int32_t*, acc_type<T>*, acc_type<T>*, acc_type<T>*, cudaStream_t);

MEDMTL_INSTANTIATE_SPATIAL_ATTENTION(float)
MEDMTL_INSTANTIATE_SPATIAL_ATTENTION(double)
MEDMTL_INSTANTIATE_SPATIAL_ATTENTION(__half)
MEDMTL_INSTANTIATE_SPATIAL_ATTENTION(__nv_bfloat16)

#undef MEDMTL_INSTANTIATE_SPATIAL_ATTENTION

}  // namespace cuda
}  // namespace medmtl
