// CUDA kernels of medmtl::multi_dilation_conv and their host launchers (no
// torch headers). The tap index math (shifts, the output range where a tap
// reads inside the map, taps that read only padding) is the
// __host__ __device__ code of csrc/core/dilated_taps.h, shared with the CPU.
//
// The host lists the taps that read the map: tap (ky, kx) of branch i at
// dilation d shifts the input by ((ky - 1) d, (kx - 1) d); a 1x1 branch has
// only its centre tap; a tap whose shift is at least the map's size reads only
// padding and is left out (at dilations 12 / 18 on 14x14 maps, all but the
// centre taps). The lists go to the kernels by value, kMaxTapsPerLaunch taps
// per launch.
//
// Forward (dilated_taps_conv_kernel): a direct convolution. A block computes a
// kTileH x kTileW tile of output pixels (one per thread) of one image for
// kOutTile output channels (fp32 accumulators in registers; double for
// double). It walks its taps, skipping those whose shifted window misses the
// map over this tile (uniform over the block), and for each tap the reduced
// channels in chunks of kRedChunk: the chunk's kRedChunk x kOutTile weights are
// staged in shared memory (coalesced, from the packed (n, 3, 3, Cin, Cout)
// weight), then every thread loads its pixel's kRedChunk shifted inputs and
// does kRedChunk * kOutTile multiply-adds from registers and broadcast shared
// reads. Each input value is read once per tap and reused for all kOutTile
// output channels. "concat" gives each branch its own output group (blocks of
// a group only walk the group's taps); "sum" is one group over all taps, with
// bias and ReLU in the epilogue. More taps than one launch takes: "concat"
// launches whole branches at a time, "sum" accumulates in an fp32 scratch
// buffer across launches and finishes in the last one.
// Backward:
//  - grad_pre_bias_kernel: grad_pre = grad_output zeroed where output <= 0 (only
//    with ReLU: stored, exactly, in the input dtype), and per-block partial sums
//    of grad_pre per channel (grad_bias, reduced by the caller).
//  - grad_x: the same conv kernel as a transposed convolution: the taps' shifts
//    negated, the reduction over the branch's Cout gradient channels, the
//    packed weight read transposed; same tap skipping.
//  - grad_weight_kernel: for each (tap, Cout tile, Cin tile) a block reduces
//    grad_pre[b, co, p] * x[b, ci, p + shift] over one slice of the (batch,
//    in-map rectangle) pixels of the tap, staging kPixelChunk pixels of both
//    operands in shared memory per step; each block writes its own partial
//    (no atomics: deterministic), summed by the caller.
#include "multi_dilation_conv_kernel.h"
#include "device_common.cuh"

#include <algorithm>
#include <vector>

#include "../core/dilated_taps.h"

namespace medmtl {
namespace cuda {
namespace multi_dilation_conv_detail {
namespace {

// Convolution blocks (forward, grad_x): a kTileH x kTileW pixel tile, kOutTile
// output channels, kRedChunk reduced channels staged per step.
constexpr int kTileH = 16;
constexpr int kTileW = 16;
constexpr int kOutTile = 16;
constexpr int kRedChunk = 16;
constexpr int kConvThreads = kTileH * kTileW;
// 3 blocks (24 warps) per SM, <= 85 registers: spill-free for every dtype on sm_80 and
// sm_90 (without a minimum ptxas picked 48 - 64 registers and spilled 4 - 40 B).
constexpr int kConvBlocksPerSM = 3;
// grad_weight blocks: a kWeightTileOut x kWeightTileIn tile of one tap's
// (Cout x Cin) gradient, kPixelChunk pixels staged per step.
constexpr int kWeightTileOut = 16;
constexpr int kWeightTileIn = 16;
constexpr int kPixelChunk = 32;
constexpr int kWeightThreads = kWeightTileOut * kWeightTileIn;
constexpr int kBiasThreads = 256;
// Taps per launch (passed by value: 24 bytes each); at least one branch's 9.
constexpr int kMaxTapsPerLaunch = 72;
constexpr int64_t kMaxGridX = 2147483647;  // 2^31 - 1
constexpr int64_t kMaxGridY = 65535;
constexpr int64_t kTargetBlocks = 2048;  // enough blocks to fill any current GPU

static_assert(kConvThreads % kWarpSize == 0 && kConvThreads <= 1024, "conv block size");
static_assert(kWeightThreads % kWarpSize == 0 && kWeightThreads <= 1024, "grad_weight block size");
static_assert(kBiasThreads % kWarpSize == 0 && kBiasThreads <= 1024, "bias block size");
static_assert(kMaxTapsPerLaunch >= 9, "a launch must take a whole branch");


__host__ __device__ __forceinline__ int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }
__host__ __device__ __forceinline__ int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Whether output position `pos` of an axis reads inside the map through `shift`.
__device__ __forceinline__ bool reads_inside(int64_t pos, int64_t shift, int64_t length) {
  return core::tap_output_begin(shift, length) <= pos && pos < core::tap_output_end(shift, length);
}


// ---------------------------------------------------------------------------
// Tap lists.

struct Tap {
  int64_t in_channel;  // first channel of the input that the tap reduces over
  int slot;            // branch * 9 + ky * 3 + kx: packed weight matrix, grad_weight slot
  int group;           // output group (of the launch) the tap contributes to
  int dy, dx;          // output (h, w) reads input (h + dy, w + dx)
};

struct TapList {
  int count = 0;
  Tap taps[kMaxTapsPerLaunch];
};

// ---------------------------------------------------------------------------
// Convolution over a tap list (the forward, and grad_x as its transpose).

struct ConvParams {
  int64_t batch = 0, height = 0, width = 0;
  int64_t in_channels = 0;   // channels per image of `in`
  int64_t red_channels = 0;  // channels each tap reduces over (from tap.in_channel)
  int64_t out_channels = 0;  // channels per output group
  int64_t out_total = 0;     // channels per image of the output
  int64_t groups = 1;        // output groups of the launch
  int64_t group0 = 0;        // group g writes channels (group0 + g) * out_channels + [0, out_channels)
  int64_t weight_slot = 0;   // elements per packed weight matrix (Cin * Cout)
  int64_t weight_out_stride = 0, weight_red_stride = 0;  // its strides along output / reduced channels
  int64_t tiles_w = 0, tiles = 0;                        // pixel tiles per tile row, per image
};

// out[b, c, h, w] = act(sum over the group's taps and reduced channels r of
// W[tap][r][c] * in[b, tap.in_channel + r, h + dy, w + dx] (+ acc_in) + bias[c]);
// with acc_out set, the raw sum goes there instead (no bias, no activation).
template <typename scalar_t>
__global__ void __launch_bounds__(kConvThreads, kConvBlocksPerSM) dilated_taps_conv_kernel(
    const scalar_t* __restrict__ in, const scalar_t* __restrict__ weight,
    const scalar_t* __restrict__ bias, ConvParams p, TapList taps, bool relu,
    const acc_type<scalar_t>* acc_in, acc_type<scalar_t>* acc_out, scalar_t* __restrict__ out) {
  using acc_t = acc_type<scalar_t>;
  __shared__ acc_t w_s[kRedChunk][kOutTile];
  const int tid = threadIdx.x;
  const int64_t plane = p.height * p.width;
  const int64_t out_tiles = ceil_div(p.out_channels, kOutTile);
  const bool out_contiguous = p.weight_out_stride == 1;
  // 32-bit index math (the wrapper checked B * H * W < 2^31); 64-bit offsets.
  const int tiles = static_cast<int>(p.tiles), tiles_w = static_cast<int>(p.tiles_w);
  const int out_tiles32 = static_cast<int>(out_tiles);
  for (int64_t bt64 = blockIdx.x; bt64 < p.batch * p.tiles; bt64 += gridDim.x) {
    const int bt = static_cast<int>(bt64);
    const int b = bt / tiles, tile = bt % tiles;
    const int64_t h0 = tile / tiles_w * kTileH, w0 = tile % tiles_w * kTileW;
    const int64_t h1 = min64(h0 + kTileH, p.height), w1 = min64(w0 + kTileW, p.width);
    const int64_t h = h0 + tid / kTileW, w = w0 + tid % kTileW;
    const bool inside = h < p.height && w < p.width;
    for (int64_t gy = blockIdx.y; gy < p.groups * out_tiles; gy += gridDim.y) {
      const int g = static_cast<int>(gy) / out_tiles32, o0 = static_cast<int>(gy) % out_tiles32 * kOutTile;
      const int n_out = static_cast<int>(min64(kOutTile, p.out_channels - o0));
      acc_t acc[kOutTile];
#pragma unroll
      for (int o = 0; o < kOutTile; ++o) acc[o] = acc_t(0);
      for (int t = 0; t < taps.count; ++t) {
        const Tap tap = taps.taps[t];
        // Uniform over the block: taps of other groups, and taps that read only
        // padding over this tile, are skipped.
        if (tap.group != g || !core::tap_reaches(tap.dy, p.height, h0, h1) ||
            !core::tap_reaches(tap.dx, p.width, w0, w1))
          continue;
        const bool reads =
            inside && reads_inside(h, tap.dy, p.height) && reads_inside(w, tap.dx, p.width);
        const scalar_t* src =
            reads ? in + (b * p.in_channels + tap.in_channel) * plane + (h + tap.dy) * p.width + w + tap.dx
                  : in;
        const scalar_t* wt = weight + tap.slot * p.weight_slot;
        for (int64_t r0 = 0; r0 < p.red_channels; r0 += kRedChunk) {
          const int n_red = static_cast<int>(min64(kRedChunk, p.red_channels - r0));
          for (int i = tid; i < kRedChunk * kOutTile; i += blockDim.x) {
            // Consecutive threads read consecutive weights.
            const int r = out_contiguous ? i / kOutTile : i % kRedChunk;
            const int o = out_contiguous ? i % kOutTile : i / kRedChunk;
            w_s[r][o] = r < n_red && o < n_out
                            ? to_acc(wt[(o0 + o) * p.weight_out_stride + (r0 + r) * p.weight_red_stride])
                            : acc_t(0);
          }
          __syncthreads();
          if (reads) {
            for (int r = 0; r < n_red; ++r) {
              const acc_t v = to_acc(src[(r0 + r) * plane]);
#pragma unroll
              for (int o = 0; o < kOutTile; ++o) acc[o] += v * w_s[r][o];
            }
          }
          __syncthreads();
        }
      }
      if (!inside) continue;
#pragma unroll
      for (int o = 0; o < kOutTile; ++o) {
        if (o >= n_out) break;
        const int64_t c = (p.group0 + g) * p.out_channels + o0 + o;
        const int64_t index = (b * p.out_total + c) * plane + h * p.width + w;
        acc_t v = acc[o];
        if (acc_in != nullptr) v += acc_in[index];
        if (acc_out != nullptr) {
          acc_out[index] = v;
          continue;
        }
        if (bias != nullptr) v += to_acc(bias[c]);
        if (relu && v < acc_t(0)) v = acc_t(0);  // NaN passes, as in torch.relu
        out[index] = FromAcc<scalar_t>::cast(v);
      }
    }
  }
}

// ---------------------------------------------------------------------------
// Backward.

// grad_pre = grad_output, zeroed where output <= 0 (relu only; written to
// grad_pre), and bias_partial[c * gridDim.x + blockIdx.x] = this block's sum of
// grad_pre over channel c.
template <typename scalar_t>
__global__ void __launch_bounds__(kBiasThreads) grad_pre_bias_kernel(
    const scalar_t* __restrict__ grad_output, const scalar_t* __restrict__ output, bool relu,
    int64_t batch, int64_t channels, int64_t plane, scalar_t* __restrict__ grad_pre,
    acc_type<scalar_t>* __restrict__ bias_partial) {
  using acc_t = acc_type<scalar_t>;
  // 32-bit index math (the wrapper checked B * H * W < 2^31); 64-bit offsets.
  const int64_t count = batch * plane, stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int hw = static_cast<int>(plane);
  for (int64_t c = blockIdx.y; c < channels; c += gridDim.y) {
    acc_t sum = 0;
    for (int64_t k64 = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; k64 < count; k64 += stride) {
      const int k = static_cast<int>(k64);
      const int64_t index = (static_cast<int64_t>(k / hw) * channels + c) * hw + k % hw;
      acc_t g = to_acc(grad_output[index]);
      if (relu) {
        if (to_acc(output[index]) <= acc_t(0)) g = acc_t(0);  // torch.relu's rule: NaN passes
        grad_pre[index] = FromAcc<scalar_t>::cast(g);  // exact: g is grad_output's value or 0
      }
      sum += g;
    }
    sum = block_sum(sum);
    if (threadIdx.x == 0) bias_partial[c * gridDim.x + blockIdx.x] = sum;
  }
}

struct WeightParams {
  int64_t batch = 0, height = 0, width = 0;
  int64_t in_channels = 0;    // Cin
  int64_t grad_channels = 0;  // channels per image of grad_pre
  int64_t out_channels = 0;   // Cout
  int64_t partials = 1;       // pixel slices per tap
  int64_t slots = 0;          // n * 9
};

// partial[part, tap.slot, co, ci] = sum over pixel slice `part` of the tap's
// (batch, in-map rectangle) of grad_pre[b, tap.in_channel + co, h, w] *
// x[b, ci, h + dy, w + dx]. Block (tap * partials + part, Cout x Cin tile).
template <typename scalar_t>
__global__ void __launch_bounds__(kWeightThreads) grad_weight_kernel(
    const scalar_t* __restrict__ grad_pre, const scalar_t* __restrict__ x, WeightParams p,
    TapList taps, acc_type<scalar_t>* __restrict__ partial) {
  using acc_t = acc_type<scalar_t>;
  // +1: the threads of a warp read different rows of x_s at the same column.
  __shared__ acc_t g_s[kWeightTileOut][kPixelChunk + 1];
  __shared__ acc_t x_s[kWeightTileIn][kPixelChunk + 1];
  const int tid = threadIdx.x;
  const int lo = tid / kWeightTileIn, li = tid % kWeightTileIn;
  const int64_t in_tiles = ceil_div(p.in_channels, kWeightTileIn);
  const int64_t tiles = ceil_div(p.out_channels, kWeightTileOut) * in_tiles;
  for (int64_t bx = blockIdx.x; bx < taps.count * p.partials; bx += gridDim.x) {
    const Tap tap = taps.taps[bx / p.partials];
    const int64_t part = bx % p.partials;
    const int64_t r0 = core::tap_output_begin(tap.dy, p.height);
    const int64_t c0 = core::tap_output_begin(tap.dx, p.width);
    const int64_t cols = core::tap_output_end(tap.dx, p.width) - c0;
    const int64_t rect = (core::tap_output_end(tap.dy, p.height) - r0) * cols;
    const int64_t total = p.batch * rect;
    const int64_t k_begin = total * part / p.partials, k_end = total * (part + 1) / p.partials;
    for (int64_t by = blockIdx.y; by < tiles; by += gridDim.y) {
      const int64_t o0 = by / in_tiles * kWeightTileOut, i0 = by % in_tiles * kWeightTileIn;
      acc_t acc = 0;
      for (int64_t k0 = k_begin; k0 < k_end; k0 += kPixelChunk) {
        const int n_k = static_cast<int>(min64(kPixelChunk, k_end - k0));
        for (int e = tid; e < kWeightTileOut * kPixelChunk; e += blockDim.x) {
          const int o = e / kPixelChunk, j = e % kPixelChunk;
          acc_t v = 0;
          if (j < n_k && o0 + o < p.out_channels) {
            const int64_t k = k0 + j, b = k / rect, q = k % rect;
            const int64_t h = r0 + q / cols, w = c0 + q % cols;
            v = to_acc(grad_pre[((b * p.grad_channels + tap.in_channel + o0 + o) * p.height + h) * p.width + w]);
          }
          g_s[o][j] = v;
        }
        for (int e = tid; e < kWeightTileIn * kPixelChunk; e += blockDim.x) {
          const int i = e / kPixelChunk, j = e % kPixelChunk;
          acc_t v = 0;
          if (j < n_k && i0 + i < p.in_channels) {
            const int64_t k = k0 + j, b = k / rect, q = k % rect;
            const int64_t h = r0 + q / cols + tap.dy, w = c0 + q % cols + tap.dx;
            v = to_acc(x[((b * p.in_channels + i0 + i) * p.height + h) * p.width + w]);
          }
          x_s[i][j] = v;
        }
        __syncthreads();
#pragma unroll 8
        for (int j = 0; j < kPixelChunk; ++j) acc += g_s[lo][j] * x_s[li][j];
        __syncthreads();
      }
      if (o0 + lo < p.out_channels && i0 + li < p.in_channels)
        partial[((part * p.slots + tap.slot) * p.out_channels + o0 + lo) * p.in_channels + i0 + li] = acc;
    }
  }
}

// ---------------------------------------------------------------------------
// Host side.

// The taps that read the map, branch by branch: in_channel = the branch's
// first channel of grad_output ("concat") or 0, group = branch, forward shifts.
std::vector<Tap> taps_reading_the_map(const MultiDilationConvDims& dims) {
  std::vector<Tap> taps;
  for (int64_t i = 0; i < dims.branches; ++i) {
    const int64_t d = dims.dilations[i];
    for (int64_t ky = 0; ky < 3; ++ky) {
      for (int64_t kx = 0; kx < 3; ++kx) {
        if (!core::tap_exists(ky, kx, d)) continue;
        const int64_t dy = core::tap_shift(ky, d), dx = core::tap_shift(kx, d);
        if (core::tap_only_padding(dy, dx, dims.height, dims.width)) continue;
        Tap tap;
        tap.in_channel = dims.concat ? i * dims.out_channels : 0;
        tap.slot = static_cast<int>(i * 9 + ky * 3 + kx);
        tap.group = static_cast<int>(i);
        tap.dy = static_cast<int>(dy);  // |dy| < height
        tap.dx = static_cast<int>(dx);
        taps.push_back(tap);
      }
    }
  }
  return taps;
}

TapList tap_list(const std::vector<Tap>& taps, size_t first, size_t count) {
  TapList list;
  list.count = static_cast<int>(count);
  for (size_t j = 0; j < count; ++j) list.taps[j] = taps[first + j];
  return list;
}

ConvParams conv_params(const MultiDilationConvDims& dims) {
  ConvParams p;
  p.batch = dims.batch;
  p.height = dims.height;
  p.width = dims.width;
  p.weight_slot = dims.in_channels * dims.out_channels;
  p.tiles_w = ceil_div(dims.width, kTileW);
  p.tiles = ceil_div(dims.height, kTileH) * p.tiles_w;
  return p;
}

template <typename scalar_t>
cudaError_t launch_conv(const ConvParams& p, const TapList& taps, const scalar_t* in,
                        const scalar_t* weight, const scalar_t* bias, bool relu,
                        const acc_type<scalar_t>* acc_in, acc_type<scalar_t>* acc_out, scalar_t* out,
                        cudaStream_t stream) {
  const int64_t blocks_x = p.batch * p.tiles;
  const int64_t blocks_y = p.groups * ceil_div(p.out_channels, kOutTile);
  if (blocks_x == 0 || blocks_y == 0) return cudaSuccess;
  const dim3 grid(static_cast<unsigned>(min64(blocks_x, kMaxGridX)),
                  static_cast<unsigned>(min64(blocks_y, kMaxGridY)));
  dilated_taps_conv_kernel<scalar_t><<<grid, kConvThreads, 0, stream>>>(in, weight, bias, p, taps, relu,
                                                                        acc_in, acc_out, out);
  return cudaGetLastError();
}

MultiDilationConvWorkspace workspace(const MultiDilationConvDims& dims, bool relu) {
  MultiDilationConvWorkspace ws;
  const int64_t taps = static_cast<int64_t>(taps_reading_the_map(dims).size());
  const int64_t plane = dims.height * dims.width, pixels = dims.batch * plane;
  const bool several_launches = taps > kMaxTapsPerLaunch;
  ws.forward_acc_elements = several_launches && !dims.concat ? pixels * dims.out_channels : 0;
  ws.grad_x_acc_elements = several_launches ? pixels * dims.in_channels : 0;
  ws.grad_pre_elements = relu ? pixels * dims.output_channels() : 0;
  // grad_weight: enough blocks in all, each slice at least 8 pixel chunks long.
  const int64_t tiles =
      ceil_div(dims.out_channels, kWeightTileOut) * ceil_div(dims.in_channels, kWeightTileIn);
  const int64_t wanted = ceil_div(kTargetBlocks, std::max<int64_t>(1, taps * tiles));
  ws.weight_partials =
      std::max<int64_t>(1, std::min({wanted, ceil_div(pixels, 8 * kPixelChunk), kMaxGridX}));
  // grad_bias: likewise, at most one block per kBiasThreads pixels.
  const int64_t wanted_bias = ceil_div(kTargetBlocks, std::max<int64_t>(1, dims.output_channels()));
  ws.bias_partials =
      std::max<int64_t>(1, std::min({wanted_bias, ceil_div(pixels, kBiasThreads), kMaxGridX}));
  return ws;
}

template <typename scalar_t>
cudaError_t forward(const MultiDilationConvDims& dims, const scalar_t* x, const scalar_t* packed_weight,
                    const scalar_t* bias, bool relu, scalar_t* out, acc_type<scalar_t>* forward_acc,
                    cudaStream_t stream) {
  if (dims.batch == 0) return cudaSuccess;
  std::vector<Tap> taps = taps_reading_the_map(dims);
  ConvParams p = conv_params(dims);
  p.in_channels = dims.in_channels;
  p.red_channels = dims.in_channels;
  p.out_channels = dims.out_channels;
  p.out_total = dims.output_channels();
  p.weight_out_stride = 1;
  p.weight_red_stride = dims.out_channels;
  for (Tap& tap : taps) tap.in_channel = 0;  // every tap reads x from its channel 0
  if (dims.concat) {
    // Whole branches per launch; group g of a launch is its branch group0 + g.
    size_t first = 0;
    while (first < taps.size()) {
      const int branch0 = taps[first].group;
      size_t end = first;
      while (end < taps.size()) {
        size_t next = end;  // one past the last tap of branch taps[end].group
        while (next < taps.size() && taps[next].group == taps[end].group) ++next;
        if (next - first > static_cast<size_t>(kMaxTapsPerLaunch)) break;
        end = next;
      }
      TapList list = tap_list(taps, first, end - first);
      for (int j = 0; j < list.count; ++j) list.taps[j].group -= branch0;
      p.group0 = branch0;
      p.groups = taps[end - 1].group - branch0 + 1;
      const cudaError_t err =
          launch_conv<scalar_t>(p, list, x, packed_weight, bias, relu, nullptr, nullptr, out, stream);
      if (err != cudaSuccess) return err;
      first = end;
    }
    return cudaSuccess;
  }
  // "sum": one group; partial sums of earlier launches go through forward_acc.
  for (Tap& tap : taps) tap.group = 0;
  for (size_t first = 0; first < taps.size(); first += kMaxTapsPerLaunch) {
    const size_t count = std::min<size_t>(kMaxTapsPerLaunch, taps.size() - first);
    const bool last = first + count == taps.size();
    const cudaError_t err = launch_conv<scalar_t>(
        p, tap_list(taps, first, count), x, packed_weight, bias, relu, first > 0 ? forward_acc : nullptr,
        last ? nullptr : forward_acc, out, stream);
    if (err != cudaSuccess) return err;
  }
  return cudaSuccess;
}

template <typename scalar_t>
cudaError_t backward(const MultiDilationConvDims& dims, const scalar_t* grad_output, const scalar_t* x,
                     const scalar_t* packed_weight, const scalar_t* output, bool relu, scalar_t* grad_x,
                     acc_type<scalar_t>* grad_weight_partial, acc_type<scalar_t>* grad_bias_partial,
                     scalar_t* grad_pre, acc_type<scalar_t>* grad_x_acc, cudaStream_t stream) {
  const MultiDilationConvWorkspace ws = workspace(dims, relu);
  const int64_t channels = dims.output_channels(), plane = dims.height * dims.width;
  {
    const dim3 grid(static_cast<unsigned>(ws.bias_partials),
                    static_cast<unsigned>(min64(channels, kMaxGridY)));
    grad_pre_bias_kernel<scalar_t><<<grid, kBiasThreads, 0, stream>>>(
        grad_output, output, relu, dims.batch, channels, plane, grad_pre, grad_bias_partial);
    const cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  const scalar_t* g = relu ? grad_pre : grad_output;
  const std::vector<Tap> taps = taps_reading_the_map(dims);

  // grad_x: the transposed convolution, all taps in one output group.
  ConvParams p = conv_params(dims);
  p.in_channels = channels;
  p.red_channels = dims.out_channels;
  p.out_channels = dims.in_channels;
  p.out_total = dims.in_channels;
  p.weight_out_stride = dims.out_channels;
  p.weight_red_stride = 1;
  std::vector<Tap> transposed = taps;
  for (Tap& tap : transposed) {
    tap.group = 0;
    tap.dy = -tap.dy;
    tap.dx = -tap.dx;
  }
  for (size_t first = 0; first < transposed.size(); first += kMaxTapsPerLaunch) {
    const size_t count = std::min<size_t>(kMaxTapsPerLaunch, transposed.size() - first);
    const bool last = first + count == transposed.size();
    const cudaError_t err = launch_conv<scalar_t>(
        p, tap_list(transposed, first, count), g, packed_weight, nullptr, false,
        first > 0 ? grad_x_acc : nullptr, last ? nullptr : grad_x_acc, grad_x, stream);
    if (err != cudaSuccess) return err;
  }

  // grad_weight partials, tap by tap.
  WeightParams wp;
  wp.batch = dims.batch;
  wp.height = dims.height;
  wp.width = dims.width;
  wp.in_channels = dims.in_channels;
  wp.grad_channels = channels;
  wp.out_channels = dims.out_channels;
  wp.partials = ws.weight_partials;
  wp.slots = dims.branches * 9;
  const int64_t tiles =
      ceil_div(dims.out_channels, kWeightTileOut) * ceil_div(dims.in_channels, kWeightTileIn);
  for (size_t first = 0; first < taps.size(); first += kMaxTapsPerLaunch) {
    const size_t count = std::min<size_t>(kMaxTapsPerLaunch, taps.size() - first);
    const dim3 grid(static_cast<unsigned>(min64(static_cast<int64_t>(count) * wp.partials, kMaxGridX)),
                    static_cast<unsigned>(min64(tiles, kMaxGridY)));
    grad_weight_kernel<scalar_t><<<grid, kWeightThreads, 0, stream>>>(
        g, x, wp, tap_list(taps, first, count), grad_weight_partial);
    const cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  return cudaSuccess;
}

}  // namespace
}  // namespace multi_dilation_conv_detail

MultiDilationConvWorkspace multi_dilation_conv_workspace(const MultiDilationConvDims& dims, bool relu) {
  return multi_dilation_conv_detail::workspace(dims, relu);
}

template <typename scalar_t>
cudaError_t launch_multi_dilation_conv_forward(const MultiDilationConvDims& dims, const scalar_t* x,
                                               const scalar_t* packed_weight, const scalar_t* bias,
                                               bool relu, scalar_t* out,
                                               acc_type<scalar_t>* forward_acc, cudaStream_t stream) {
  return multi_dilation_conv_detail::forward(dims, x, packed_weight, bias, relu, out, forward_acc, stream);
}

template <typename scalar_t>
cudaError_t launch_multi_dilation_conv_backward(
    const MultiDilationConvDims& dims, const scalar_t* grad_output, const scalar_t* x,
    const scalar_t* packed_weight, const scalar_t* output, bool relu, scalar_t* grad_x,
    acc_type<scalar_t>* grad_weight_partial, acc_type<scalar_t>* grad_bias_partial,
    scalar_t* grad_pre, acc_type<scalar_t>* grad_x_acc, cudaStream_t stream) {
  return multi_dilation_conv_detail::backward(dims, grad_output, x, packed_weight, output, relu, grad_x,
                                              grad_weight_partial, grad_bias_partial, grad_pre, grad_x_acc,
                                              stream);
}

#define MEDMTL_INSTANTIATE_MULTI_DILATION_CONV(T)                                                  \
  template cudaError_t launch_multi_dilation_conv_forward<T>(                                      \
      const MultiDilationConvDims&, const T*, const T*, const T*, bool, T*, acc_type<T>*,          \
      cudaStream_t);                                                                               \
  template cudaError_t launch_multi_dilation_conv_backward<T>(                                     \
      const MultiDilationConvDims&, const T*, const T*, const T*, const T*, bool, T*, acc_type<T>*, \
      acc_type<T>*, T*, acc_type<T>*, cudaStream_t);

MEDMTL_INSTANTIATE_MULTI_DILATION_CONV(float)
MEDMTL_INSTANTIATE_MULTI_DILATION_CONV(double)
MEDMTL_INSTANTIATE_MULTI_DILATION_CONV(__half)
MEDMTL_INSTANTIATE_MULTI_DILATION_CONV(__nv_bfloat16)

#undef MEDMTL_INSTANTIATE_MULTI_DILATION_CONV

}  // namespace cuda
}  // namespace medmtl
