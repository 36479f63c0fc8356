// CUDA kernels of medmtl::window_attention and their host launchers (no torch
// headers). The window index math (which map token is in-window token r of a
// window, padding, shift regions, bias table rows) is the __host__ __device__
// code of csrc/core/window_geometry.h, shared with the CPU kernels, here in
// 32-bit (core::WindowGeometry32: the launchers refuse a geometry whose
// window_index_extent exceeds INT32_MAX); element offsets are 64-bit.
//
// Per window and head: S_ij = scale q_i.k_j + table[bias_row(i, j), h] over
// the window's N tokens (padded tokens have key pad_key[h] and value
// pad_value[h]); keys of another shift region are excluded; out = softmax(S) v
// for the real queries only; lse_i = logsumexp_j S_ij.
//
// Forward (window_attention_forward_kernel): one block of kThreads threads per
// (image, window, head, tile of TQ queries), grid-stride over these items.
// Tokens are gathered by index arithmetic (window_token): a tile's positions,
// regions and element offsets sit in shared memory. The keys are walked in
// tiles of TK with an online softmax (running max and sum per query): the
// scores of a TQ x TK tile are accumulated in registers (TQ * TK / kThreads per
// thread) over head_dim chunks of C staged in shared memory (q, k, v: acc_type),
// written with bias and mask to shared memory, turned into probabilities by one
// thread per query, and multiplied into the output accumulators (registers,
// TQ * C / kThreads per thread). head_dim > C: the output is produced one
// chunk at a time; the first chunk's pass gives lse, the later ones recompute
// the scores and use P = exp(S - lse). No N x N tensor in global memory.
// Backward:
//  1. window_attention_delta_kernel: delta = rowsum(grad_out * out) per (token,
//     head), one warp per row.
//  2. window_attention_backward_kernel: one block per (image, window, head),
//     grid-stride. For each key tile (outer loop), for each query tile: the
//     scores and dP = dO v^T are recomputed (registers, over staged head_dim
//     chunks), P = exp(S - lse), dS = P (dP - delta) go to shared memory; dK,
//     dV of the key tile accumulate in registers; dQ accumulates in global
//     memory (the block owns the window's queries: grad_q itself for float and
//     double, an fp32 scratch for 16-bit types, converted at the end). Real
//     keys write dK, dV; padded keys' dK, dV are summed into the window's
//     grad_pad_key / grad_pad_value partial. The bias table gradient (sum of dS
//     per table row) accumulates per window in shared memory (global memory,
//     the window's partial slot, when the table has more than kSharedBiasRows
//     rows): for each query row of a dS tile, one thread per key adds its dS
//     (the keys of one query have distinct table rows, so one row at a time,
//     separated by __syncthreads, needs no atomics). Every window writes its
//     partials; the caller sums them (deterministic). head_dim > C: one pass
//     per output chunk, each recomputing S and dP.
#include "window_attention_kernel.h"
#include "device_common.cuh"

#include <cmath>
#include <type_traits>

namespace medmtl {
namespace cuda {
namespace window_attention_detail {
namespace {

constexpr int kThreads = 128;  // every kernel's block
// The forward keeps 4 blocks per SM (<= 128 registers per thread): its accumulators
// (TQ * TK + TQ * C) / kThreads = 24 per thread fit with the staging loops unrolled.
// Double (two registers per value, a division and a log that are calls) keeps 3
// (<= 168 registers): at 128 it spills 24 B around those calls on sm_90.
constexpr int kForwardBlocksPerSM = 4;
constexpr int kForwardBlocksPerSMDouble = 3;
// The backward fits 128 registers on sm_80 (4 blocks by registers; its 43.3 KB of shared
// memory allow 3). On sm_90 ptxas needs 206 - 214 for the same code (2 blocks): at 168 or
// 128 it spills (stack frames of 64 - 216 B; docs/gpu_expectations.md).
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
constexpr int kBackwardBlocksPerSM = 2;
#else
constexpr int kBackwardBlocksPerSM = 4;
#endif
// Tiles (float, half, bfloat16: fp32 accumulation).
constexpr int kTileQueries = 32;
constexpr int kTileKeys = 32;
constexpr int kForwardChunk = 64;   // head_dim staged per step, forward
constexpr int kBackwardChunk = 32;  // head_dim staged per step, backward
constexpr int kSharedBiasRows = 4096;  // largest table with a shared-memory gradient
// Tiles of double (twice the bytes per element, same shared memory budget).
constexpr int kTileQueriesDouble = 16;
constexpr int kTileKeysDouble = 16;
constexpr int kForwardChunkDouble = 32;
constexpr int kBackwardChunkDouble = 16;
constexpr int kSharedBiasRowsDouble = 2560;
constexpr int64_t kMaxGridX = 2147483647;  // 2^31 - 1
constexpr int64_t kMaxIndex32 = 2147483647;  // the kernels' index math is 32-bit

static_assert(kThreads % kWarpSize == 0 && kThreads <= 1024, "block size");
static_assert(kTileKeys <= kThreads && kTileKeysDouble <= kThreads, "one thread per key of a tile");

template <typename acc_t>
struct Tiles {
  static constexpr int queries = kTileQueries, keys = kTileKeys;
  static constexpr int forward_chunk = kForwardChunk, backward_chunk = kBackwardChunk;
  static constexpr int bias_rows = kSharedBiasRows;
};
template <>
struct Tiles<double> {
  static constexpr int queries = kTileQueriesDouble, keys = kTileKeysDouble;
  static constexpr int forward_chunk = kForwardChunkDouble, backward_chunk = kBackwardChunkDouble;
  static constexpr int bias_rows = kSharedBiasRowsDouble;
};

constexpr int kNone = 0;     // past the window's last token
constexpr int kPadding = 1;  // a padded token (pad_key / pad_value)
constexpr int kReal = 2;     // a token of the map

__host__ __device__ __forceinline__ int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }
__host__ __device__ __forceinline__ constexpr int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
__host__ __device__ __forceinline__ constexpr int ceil_div32(int a, int b) { return (a + b - 1) / b; }
__host__ __device__ __forceinline__ int min32(int a, int b) { return a < b ? a : b; }

__device__ __forceinline__ float exp_acc(float x) { return expf(x); }
__device__ __forceinline__ double exp_acc(double x) { return exp(x); }
__device__ __forceinline__ float log_acc(float x) { return logf(x); }
__device__ __forceinline__ double log_acc(double x) { return log(x); }

// The tokens of a tile of a window: bias offsets (core::bias_offset of the
// in-window position), regions, kinds, and for real tokens the element offsets of the head in two token maps and the
// row of the contiguous (B, *S, heads) layout (below window_index_extent).
template <int T>
struct TileTokens {
  int bias[T];
  int64_t off[2][T];
  int row[T];
  int region[T];
  int kind[T];
};

__device__ __forceinline__ int64_t token_offset(const WindowTokenStrides& s, int b, const int* coord, int h) {
  return b * s.batch + coord[0] * s.dim[0] + coord[1] * s.dim[1] + coord[2] * s.dim[2] + h * s.head;
}

__device__ __forceinline__ int row_index(const core::WindowGeometry32& g, int b, const int* coord, int h) {
  return (((b * g.size[0] + coord[0]) * g.size[1] + coord[1]) * g.size[2] + coord[2]) * g.heads + h;
}

// In-window tokens first .. first + T - 1 of window `window` of image b.
template <int T>
__device__ void load_tile_tokens(const core::WindowGeometry32& g, int b, int window, int h, int first,
                                 const WindowTokenStrides& s0, const WindowTokenStrides& s1, TileTokens<T>& tile) {
  for (int j = threadIdx.x; j < T; j += kThreads) {
    const int r = first + j;
    if (r >= g.tokens) {
      tile.kind[j] = kNone;
      continue;
    }
    int pos[core::kWindowDims], coord[core::kWindowDims];
    const bool real = core::window_token(g, window, r, pos, coord);
    tile.bias[j] = core::bias_offset(g, pos);
    tile.region[j] = core::window_region(g, window, pos);
    tile.kind[j] = real ? kReal : kPadding;
    if (real) {
      tile.off[0][j] = token_offset(s0, b, coord, h);
      tile.off[1][j] = token_offset(s1, b, coord, h);
      tile.row[j] = row_index(g, b, coord, h);
    }
  }
}

// Whether query i of the query tile attends to key j of the key tile (a key
// of another shift region does, with region_penalty added, as in Swin).
template <int TQ, int TK>
__device__ __forceinline__ bool visible(const core::WindowGeometry32& g, const TileTokens<TQ>& queries,
                                        const TileTokens<TK>& keys, int i, int j) {
  return queries.kind[i] == kReal && keys.kind[j] != kNone;
}

// Swin's additive mask: -100 on the scores of keys of another shift region.
template <typename acc_t, int TQ, int TK>
__device__ __forceinline__ acc_t region_penalty(const core::WindowGeometry32& g, const TileTokens<TQ>& queries,
                                                const TileTokens<TK>& keys, int i, int j) {
  return g.masked && queries.region[i] != keys.region[j] ? acc_t(core::kRegionMask) : acc_t(0);
}

// ---------------------------------------------------------------------------
// Kernels.

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads, std::is_same_v<scalar_t, double> ? kForwardBlocksPerSMDouble
                                                                             : kForwardBlocksPerSM)
    window_attention_forward_kernel(
    const core::WindowGeometry32 g, const scalar_t* __restrict__ q, const WindowTokenStrides q_strides,
    const scalar_t* __restrict__ k, const WindowTokenStrides k_strides, const scalar_t* __restrict__ v,
    const WindowTokenStrides v_strides, const scalar_t* __restrict__ table, const scalar_t* __restrict__ pad_key,
    const scalar_t* __restrict__ pad_value, const acc_type<scalar_t> scale, scalar_t* __restrict__ out,
    acc_type<scalar_t>* __restrict__ lse) {
  using acc_t = acc_type<scalar_t>;
  constexpr int TQ = Tiles<acc_t>::queries, TK = Tiles<acc_t>::keys, C = Tiles<acc_t>::forward_chunk;
  constexpr int kScores = static_cast<int>(ceil_div(TQ * TK, kThreads));
  constexpr int kOuts = static_cast<int>(ceil_div(TQ * C, kThreads));
  __shared__ acc_t q_s[TQ][C];
  __shared__ acc_t k_s[TK][C];
  __shared__ acc_t v_s[TK][C];
  __shared__ acc_t p_s[TQ][TK];  // scores (-inf: not visible), then probabilities
  __shared__ acc_t row_max[TQ], row_sum[TQ], row_alpha[TQ], row_lse[TQ];
  __shared__ TileTokens<TQ> queries;
  __shared__ TileTokens<TK> keys;
  const int tid = threadIdx.x;
  const int hd = g.head_dim, chunks = ceil_div32(hd, C);
  const int qtiles = ceil_div32(g.tokens, TQ), ktiles = ceil_div32(g.tokens, TK);
  const int items = g.batch * g.windows * g.heads * qtiles;  // <= window_index_extent
  const int center = core::bias_center(g);  // bias row = queries.bias - keys.bias + center
  for (int64_t item64 = blockIdx.x; item64 < items; item64 += gridDim.x) {
    const int item = static_cast<int>(item64);
    const int qt = item % qtiles, h = item / qtiles % g.heads, bw = item / qtiles / g.heads;
    const int b = bw / g.windows, w = bw % g.windows;
    load_tile_tokens(g, b, w, h, qt * TQ, q_strides, q_strides, queries);
    for (int c = 0; c < chunks; ++c) {
      const int c0 = c * C;
      acc_t o[kOuts];
#pragma unroll
      for (int m = 0; m < kOuts; ++m) o[m] = acc_t(0);
      if (c == 0) {
        for (int i = tid; i < TQ; i += kThreads) {
          row_max[i] = -INFINITY;
          row_sum[i] = acc_t(0);
        }
      }
      for (int kt = 0; kt < ktiles; ++kt) {
        load_tile_tokens(g, b, w, h, kt * TK, k_strides, v_strides, keys);
        acc_t s[kScores];
#pragma unroll
        for (int m = 0; m < kScores; ++m) s[m] = acc_t(0);
        // The chunks in the order that ends with chunk c (whose v is staged).
        for (int n = 0; n < chunks; ++n) {
          const int cc = (c + 1 + n) % chunks, d0 = cc * C;
          const int dims = min32(C, hd - d0);
          const bool with_v = cc == c;
          __syncthreads();  // tokens loaded; the previous chunk's (or tile's) readers are done
          for (int e = tid; e < TQ * C; e += kThreads) {
            const int i = e / C, d = e % C;
            q_s[i][d] = queries.kind[i] == kReal && d < dims ? to_acc(q[queries.off[0][i] + d0 + d]) : acc_t(0);
          }
          for (int e = tid; e < TK * C; e += kThreads) {
            const int j = e / C, d = e % C;
            acc_t kv = 0, vv = 0;
            if (d < dims && keys.kind[j] == kReal) {
              kv = to_acc(k[keys.off[0][j] + d0 + d]);
              if (with_v) vv = to_acc(v[keys.off[1][j] + d0 + d]);
            } else if (d < dims && keys.kind[j] == kPadding) {
              kv = to_acc(pad_key[static_cast<int64_t>(h) * hd + d0 + d]);
              if (with_v) vv = to_acc(pad_value[static_cast<int64_t>(h) * hd + d0 + d]);
            }
            k_s[j][d] = kv;
            if (with_v) v_s[j][d] = vv;
          }
          __syncthreads();
#pragma unroll
          for (int m = 0; m < kScores; ++m) {
            const int e = tid + m * kThreads;
            if (e < TQ * TK) {
              const int i = e / TK, j = e % TK;
              acc_t dot = 0;
              for (int d = 0; d < dims; ++d) dot += q_s[i][d] * k_s[j][d];
              s[m] += dot;
            }
          }
        }
#pragma unroll
        for (int m = 0; m < kScores; ++m) {
          const int e = tid + m * kThreads;
          if (e < TQ * TK) {
            const int i = e / TK, j = e % TK;
            acc_t score = -INFINITY;
            if (visible(g, queries, keys, i, j))
              score = scale * s[m] + to_acc(table[(queries.bias[i] - keys.bias[j] + center) * g.heads + h]) +
                      region_penalty<acc_t>(g, queries, keys, i, j);
            p_s[i][j] = score;
          }
        }
        __syncthreads();
        // Probabilities: one thread per query.
        for (int i = tid; i < TQ; i += kThreads) {
          if (c == 0) {
            const acc_t old = row_max[i];
            acc_t mx = old;
            for (int j = 0; j < TK; ++j) mx = p_s[i][j] > mx ? p_s[i][j] : mx;
            acc_t alpha = 1, sum = 0;
            if (mx == -INFINITY) {  // nothing visible yet (or not a query)
              for (int j = 0; j < TK; ++j) p_s[i][j] = acc_t(0);
            } else {
              alpha = exp_acc(old - mx);  // 0 when old is -inf
              for (int j = 0; j < TK; ++j) {
                const acc_t sv = p_s[i][j];
                const acc_t p = sv == -INFINITY ? acc_t(0) : exp_acc(sv - mx);
                p_s[i][j] = p;
                sum += p;
              }
            }
            row_max[i] = mx;
            row_sum[i] = row_sum[i] * alpha + sum;
            row_alpha[i] = alpha;
          } else {
            const acc_t l = row_lse[i];
            for (int j = 0; j < TK; ++j) {
              const acc_t sv = p_s[i][j];
              p_s[i][j] = sv == -INFINITY ? acc_t(0) : exp_acc(sv - l);
            }
            row_alpha[i] = acc_t(1);
          }
        }
        __syncthreads();
#pragma unroll
        for (int m = 0; m < kOuts; ++m) {
          const int e = tid + m * kThreads;
          if (e < TQ * C) {
            const int i = e / C, d = e % C;
            acc_t acc = o[m] * row_alpha[i];
#pragma unroll 4  // a full unroll keeps all TK values of v_s[.][d] live: spills
            for (int j = 0; j < TK; ++j) acc += p_s[i][j] * v_s[j][d];
            o[m] = acc;
          }
        }
        __syncthreads();  // p_s, v_s, keys are rewritten by the next tile
      }
      if (c == 0) {
        for (int i = tid; i < TQ; i += kThreads) {
          if (queries.kind[i] != kReal) continue;
          row_lse[i] = row_max[i] + log_acc(row_sum[i]);
          lse[queries.row[i]] = row_lse[i];
        }
      }
      const int dims_c = min32(C, hd - c0);
#pragma unroll
      for (int m = 0; m < kOuts; ++m) {
        const int e = tid + m * kThreads;
        if (e < TQ * C) {
          const int i = e / C, d = e % C;
          if (queries.kind[i] == kReal && d < dims_c)
            out[static_cast<int64_t>(queries.row[i]) * hd + c0 + d] = FromAcc<scalar_t>::cast(c == 0 ? o[m] / row_sum[i] : o[m]);
        }
      }
      __syncthreads();  // row_lse for the next chunk; queries for the next item
    }
  }
}

// delta[row] = sum_d grad_out[row, d] * out[row, d], rows = (B, *S, heads); one warp per row.
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads) window_attention_delta_kernel(
    const core::WindowGeometry32 g, const scalar_t* __restrict__ grad_out, const WindowTokenStrides go_strides,
    const scalar_t* __restrict__ out, const WindowTokenStrides out_strides, acc_type<scalar_t>* __restrict__ delta) {
  using acc_t = acc_type<scalar_t>;
  constexpr int kWarps = kThreads / kWarpSize;
  const int lane = threadIdx.x % kWarpSize, warp = threadIdx.x / kWarpSize;
  const int rows = g.batch * g.size[0] * g.size[1] * g.size[2] * g.heads;  // <= window_index_extent
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kWarps;
  for (int64_t row64 = static_cast<int64_t>(blockIdx.x) * kWarps + warp; row64 < rows; row64 += stride) {
    const int row = static_cast<int>(row64);
    int coord[core::kWindowDims];
    int rest = row / g.heads;
    const int h = row % g.heads;
    for (int d = core::kWindowDims - 1; d >= 0; --d) {
      coord[d] = rest % g.size[d];
      rest /= g.size[d];
    }
    const scalar_t* go = grad_out + token_offset(go_strides, rest, coord, h);
    const scalar_t* o = out + token_offset(out_strides, rest, coord, h);
    acc_t sum = 0;
    for (int d = lane; d < g.head_dim; d += kWarpSize) sum += to_acc(go[d]) * to_acc(o[d]);
    sum = warp_sum(sum);
    if (lane == 0) delta[row] = sum;
  }
}

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads, kBackwardBlocksPerSM) window_attention_backward_kernel(
    const core::WindowGeometry32 g, const scalar_t* __restrict__ grad_out, const WindowTokenStrides go_strides,
    const scalar_t* __restrict__ q, const WindowTokenStrides q_strides, const scalar_t* __restrict__ k,
    const WindowTokenStrides k_strides, const scalar_t* __restrict__ v, const WindowTokenStrides v_strides,
    const acc_type<scalar_t>* __restrict__ lse, const acc_type<scalar_t>* __restrict__ delta,
    const scalar_t* __restrict__ table, const scalar_t* __restrict__ pad_key, const scalar_t* __restrict__ pad_value,
    const acc_type<scalar_t> scale, scalar_t* __restrict__ grad_q, scalar_t* __restrict__ grad_k,
    scalar_t* __restrict__ grad_v, acc_type<scalar_t>* __restrict__ grad_q_acc,
    acc_type<scalar_t>* __restrict__ table_partial, acc_type<scalar_t>* __restrict__ pad_key_partial,
    acc_type<scalar_t>* __restrict__ pad_value_partial) {
  using acc_t = acc_type<scalar_t>;
  constexpr int TQ = Tiles<acc_t>::queries, TK = Tiles<acc_t>::keys, C = Tiles<acc_t>::backward_chunk;
  constexpr int BR = Tiles<acc_t>::bias_rows;
  constexpr int kScores = static_cast<int>(ceil_div(TQ * TK, kThreads));
  constexpr int kKeyOuts = static_cast<int>(ceil_div(TK * C, kThreads));
  __shared__ acc_t q_s[TQ][C];
  __shared__ acc_t do_s[TQ][C];
  __shared__ acc_t k_s[TK][C];  // keys, then the padded keys' dK
  __shared__ acc_t v_s[TK][C];  // values, then the padded keys' dV
  __shared__ acc_t p_s[TQ][TK];
  __shared__ acc_t ds_s[TQ][TK];
  __shared__ acc_t q_lse[TQ], q_delta[TQ];
  __shared__ acc_t hist_s[BR];
  __shared__ TileTokens<TQ> queries;
  __shared__ TileTokens<TK> keys;
  acc_t* dq_acc;
  if constexpr (std::is_same_v<scalar_t, acc_t>)
    dq_acc = grad_q;
  else
    dq_acc = grad_q_acc;
  const int tid = threadIdx.x;
  const int hd = g.head_dim, chunks = ceil_div32(hd, C), rows = g.table_rows;
  const int qtiles = ceil_div32(g.tokens, TQ), ktiles = ceil_div32(g.tokens, TK);
  const int items = g.batch * g.windows * g.heads;  // <= window_index_extent
  const int center = core::bias_center(g);  // bias row = queries.bias - keys.bias + center
  const bool shared_hist = rows <= BR;
  for (int64_t item64 = blockIdx.x; item64 < items; item64 += gridDim.x) {
    const int item = static_cast<int>(item64);
    const int h = item % g.heads, bw = item / g.heads;
    const int b = bw / g.windows, w = bw % g.windows;
    acc_t* hist = shared_hist ? hist_s : table_partial + static_cast<int64_t>(bw) * rows * g.heads + h;
    const int hist_stride = shared_hist ? 1 : g.heads;
    acc_t* pad_k = pad_key_partial + static_cast<int64_t>(item) * hd;  // item = bw * heads + h
    acc_t* pad_v = pad_value_partial + static_cast<int64_t>(item) * hd;
    for (int r = tid; r < rows; r += kThreads) hist[r * hist_stride] = acc_t(0);
    for (int d = tid; d < hd; d += kThreads) {
      pad_k[d] = acc_t(0);
      pad_v[d] = acc_t(0);
    }
    for (int c = 0; c < chunks; ++c) {
      const int c0 = c * C;
      const int dims_c = min32(C, hd - c0);
      for (int kt = 0; kt < ktiles; ++kt) {
        __syncthreads();  // the previous tile's readers of keys, k_s, v_s are done
        load_tile_tokens(g, b, w, h, kt * TK, k_strides, v_strides, keys);
        acc_t dk[kKeyOuts], dv[kKeyOuts];
        for (int m = 0; m < kKeyOuts; ++m) dk[m] = dv[m] = acc_t(0);
        for (int qt = 0; qt < qtiles; ++qt) {
          __syncthreads();  // the previous query tile's readers are done
          load_tile_tokens(g, b, w, h, qt * TQ, q_strides, go_strides, queries);
          for (int i = tid; i < TQ; i += kThreads) {
            if (queries.kind[i] != kReal) continue;
            q_lse[i] = lse[queries.row[i]];
            q_delta[i] = delta[queries.row[i]];
          }
          acc_t s[kScores], dp[kScores];
          for (int m = 0; m < kScores; ++m) s[m] = dp[m] = acc_t(0);
          // The chunks in the order that ends with chunk c (kept for the updates).
          for (int n = 0; n < chunks; ++n) {
            const int cc = (c + 1 + n) % chunks, d0 = cc * C;
            const int dims = min32(C, hd - d0);
            __syncthreads();
            for (int e = tid; e < TQ * C; e += kThreads) {
              const int i = e / C, d = e % C;
              const bool in = queries.kind[i] == kReal && d < dims;
              q_s[i][d] = in ? to_acc(q[queries.off[0][i] + d0 + d]) : acc_t(0);
              do_s[i][d] = in ? to_acc(grad_out[queries.off[1][i] + d0 + d]) : acc_t(0);
            }
            for (int e = tid; e < TK * C; e += kThreads) {
              const int j = e / C, d = e % C;
              acc_t kv = 0, vv = 0;
              if (d < dims && keys.kind[j] == kReal) {
                kv = to_acc(k[keys.off[0][j] + d0 + d]);
                vv = to_acc(v[keys.off[1][j] + d0 + d]);
              } else if (d < dims && keys.kind[j] == kPadding) {
                kv = to_acc(pad_key[static_cast<int64_t>(h) * hd + d0 + d]);
                vv = to_acc(pad_value[static_cast<int64_t>(h) * hd + d0 + d]);
              }
              k_s[j][d] = kv;
              v_s[j][d] = vv;
            }
            __syncthreads();
            // Score m of this thread is element tid + m * kThreads of the TQ x TK tile, d
            // outermost: with kThreads a multiple of TK its key is the same for every m, so
            // each k_s / v_s value is read once per d.
            for (int d = 0; d < dims; ++d) {
#pragma unroll
              for (int m = 0; m < kScores; ++m) {
                const int e = tid + m * kThreads;
                if (e < TQ * TK) {
                  const int i = e / TK, j = (kThreads % TK == 0 ? tid : e) % TK;
                  s[m] += q_s[i][d] * k_s[j][d];
                  dp[m] += do_s[i][d] * v_s[j][d];
                }
              }
            }
          }
          for (int m = 0; m < kScores; ++m) {
            const int e = tid + m * kThreads;
            if (e < TQ * TK) {
              const int i = e / TK, j = e % TK;
              acc_t p = 0, ds = 0;
              if (visible(g, queries, keys, i, j)) {
                const acc_t bias =
                    to_acc(table[(queries.bias[i] - keys.bias[j] + center) * g.heads + h]);
                p = exp_acc(scale * s[m] + bias + region_penalty<acc_t>(g, queries, keys, i, j) - q_lse[i]);
                ds = p * (dp[m] - q_delta[i]);
              }
              p_s[i][j] = p;
              ds_s[i][j] = ds;
            }
          }
          __syncthreads();
          if (c == 0) {
            // grad_table: one query row at a time (its keys have distinct table rows).
            for (int i = 0; i < TQ; ++i) {
              if (queries.kind[i] != kReal) continue;  // uniform over the block
              for (int j = tid; j < TK; j += kThreads)
                if (visible(g, queries, keys, i, j))
                  hist[(queries.bias[i] - keys.bias[j] + center) * hist_stride] += ds_s[i][j];
              __syncthreads();
            }
          }
          for (int m = 0; m < kKeyOuts; ++m) {
            const int e = tid + m * kThreads;
            if (e < TK * C) {
              const int j = e / C, d = e % C;
              acc_t a = 0, bv = 0;
#pragma unroll 4
              for (int i = 0; i < TQ; ++i) {
                a += ds_s[i][j] * q_s[i][d];
                bv += p_s[i][j] * do_s[i][d];
              }
              dk[m] += a;
              dv[m] += bv;
            }
          }
          for (int e = tid; e < TQ * C; e += kThreads) {
            const int i = e / C, d = e % C;
            if (queries.kind[i] != kReal || d >= dims_c) continue;
            acc_t a = 0;
#pragma unroll 4
            for (int j = 0; j < TK; ++j) a += ds_s[i][j] * k_s[j][d];
            a *= scale;
            acc_t* dst = dq_acc + static_cast<int64_t>(queries.row[i]) * hd + c0 + d;
            *dst = kt == 0 ? a : *dst + a;
          }
        }
        __syncthreads();  // the readers of k_s, v_s are done
        bool any_padding = false;
        for (int j = 0; j < TK; ++j) any_padding = any_padding || keys.kind[j] == kPadding;
        for (int m = 0; m < kKeyOuts; ++m) {
          const int e = tid + m * kThreads;
          if (e < TK * C) {
            const int j = e / C, d = e % C;
            if (keys.kind[j] == kReal && d < dims_c) {
              const int64_t index = static_cast<int64_t>(keys.row[j]) * hd + c0 + d;
              grad_k[index] = FromAcc<scalar_t>::cast(scale * dk[m]);
              grad_v[index] = FromAcc<scalar_t>::cast(dv[m]);
            }
            if (any_padding) {
              const bool pad = keys.kind[j] == kPadding;
              k_s[j][d] = pad ? scale * dk[m] : acc_t(0);
              v_s[j][d] = pad ? dv[m] : acc_t(0);
            }
          }
        }
        if (any_padding) {  // uniform over the block
          __syncthreads();
          for (int d = tid; d < dims_c; d += kThreads) {
            acc_t sk = 0, sv = 0;
            for (int j = 0; j < TK; ++j) {
              sk += k_s[j][d];
              sv += v_s[j][d];
            }
            pad_k[c0 + d] += sk;
            pad_v[c0 + d] += sv;
          }
        }
      }
    }
    __syncthreads();  // hist complete (16-bit types: window_attention_cast_kernel converts dq_acc)
    if (shared_hist)
      for (int r = tid; r < rows; r += kThreads)
        table_partial[(static_cast<int64_t>(bw) * rows + r) * g.heads + h] = hist_s[r];
    __syncthreads();  // hist_s and the tiles are rewritten by the next item
  }
}

// grad_q = grad_q_acc, element by element (16-bit types: the backward kernel
// accumulates dQ in fp32 scratch of grad_q's contiguous layout).
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads) window_attention_cast_kernel(const acc_type<scalar_t>* __restrict__ src,
                                                                         scalar_t* __restrict__ dst, int64_t n) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kThreads;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; i < n; i += stride)
    dst[i] = FromAcc<scalar_t>::cast(src[i]);
}

// ---------------------------------------------------------------------------
// Host side.

dim3 grid_for(int64_t blocks) { return dim3(static_cast<unsigned>(min64(blocks < 1 ? 1 : blocks, kMaxGridX))); }

}  // namespace
}  // namespace window_attention_detail

// The launchers of window_attention_kernel.h.

template <typename scalar_t>
WindowAttentionWorkspace window_attention_workspace(const core::WindowGeometry& g) {
  WindowAttentionWorkspace ws;
  const int64_t rows = g.batch * g.size[0] * g.size[1] * g.size[2] * g.heads;
  ws.delta_elements = rows;
  ws.grad_q_acc_elements = std::is_same_v<scalar_t, acc_type<scalar_t>> ? 0 : rows * g.head_dim;
  ws.partials = g.batch * g.windows;
  return ws;
}

template <typename scalar_t>
cudaError_t launch_window_attention_forward(const core::WindowGeometry& g, const scalar_t* q,
                                            const WindowTokenStrides& qs, const scalar_t* k,
                                            const WindowTokenStrides& ks, const scalar_t* v,
                                            const WindowTokenStrides& vs, const scalar_t* table,
                                            const scalar_t* pad_key, const scalar_t* pad_value, double scale,
                                            scalar_t* out, acc_type<scalar_t>* lse, cudaStream_t stream) {
  using namespace window_attention_detail;
  using acc_t = acc_type<scalar_t>;
  if (g.batch == 0) return cudaSuccess;
  if (core::window_index_extent(g) > kMaxIndex32) return cudaErrorInvalidValue;
  const int64_t items = g.batch * g.windows * g.heads * ceil_div(g.tokens, Tiles<acc_t>::queries);
  window_attention_forward_kernel<scalar_t><<<grid_for(items), kThreads, 0, stream>>>(
      core::narrow_window_geometry(g), q, qs, k, ks, v, vs, table, pad_key, pad_value, static_cast<acc_t>(scale), out, lse);
  return cudaGetLastError();
}

template <typename scalar_t>
cudaError_t launch_window_attention_backward(
    const core::WindowGeometry& g, const scalar_t* grad_out, const WindowTokenStrides& gos, const scalar_t* q,
    const WindowTokenStrides& qs, const scalar_t* k, const WindowTokenStrides& ks, const scalar_t* v,
    const WindowTokenStrides& vs, const scalar_t* out, const WindowTokenStrides& outs,
    const acc_type<scalar_t>* lse, const scalar_t* table, const scalar_t* pad_key, const scalar_t* pad_value,
    double scale, scalar_t* grad_q, scalar_t* grad_k, scalar_t* grad_v, acc_type<scalar_t>* table_partial,
    acc_type<scalar_t>* pad_key_partial, acc_type<scalar_t>* pad_value_partial, acc_type<scalar_t>* delta,
    acc_type<scalar_t>* grad_q_acc, cudaStream_t stream) {
  using namespace window_attention_detail;
  using acc_t = acc_type<scalar_t>;
  if (g.batch == 0) return cudaSuccess;
  if (core::window_index_extent(g) > kMaxIndex32) return cudaErrorInvalidValue;
  const core::WindowGeometry32 g32 = core::narrow_window_geometry(g);
  const int64_t rows = g.batch * g.size[0] * g.size[1] * g.size[2] * g.heads;
  window_attention_delta_kernel<scalar_t><<<grid_for(ceil_div(rows, kThreads / kWarpSize)), kThreads, 0, stream>>>(
      g32, grad_out, gos, out, outs, delta);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  window_attention_backward_kernel<scalar_t><<<grid_for(g.batch * g.windows * g.heads), kThreads, 0, stream>>>(
      g32, grad_out, gos, q, qs, k, ks, v, vs, lse, delta, table, pad_key, pad_value, static_cast<acc_t>(scale),
      grad_q, grad_k, grad_v, grad_q_acc, table_partial, pad_key_partial, pad_value_partial);
  if constexpr (!std::is_same_v<scalar_t, acc_t>) {
    err = cudaGetLastError();
    if (err != cudaSuccess) return err;
    const int64_t n = window_attention_workspace<scalar_t>(g).grad_q_acc_elements;
    window_attention_cast_kernel<scalar_t><<<grid_for(ceil_div(n, kThreads)), kThreads, 0, stream>>>(grad_q_acc,
                                                                                                   grad_q, n);
  }
  return cudaGetLastError();
}

#define MEDMTL_INSTANTIATE_WINDOW_ATTENTION(T)                                                                  \
  template WindowAttentionWorkspace window_attention_workspace<T>(const core::WindowGeometry&);                \
  template cudaError_t launch_window_attention_forward<T>(                                                      \
      const core::WindowGeometry&, const T*, const WindowTokenStrides&, const T*, const WindowTokenStrides&,    \
      const T*, const WindowTokenStrides&, const T*, const T*, const T*, double, T*, acc_type<T>*, cudaStream_t); \
  template cudaError_t launch_window_attention_backward<T>(                                                     \
      const core::WindowGeometry&, const T*, const WindowTokenStrides&, const T*, const WindowTokenStrides&,    \
      const T*, const WindowTokenStrides&, const T*, const WindowTokenStrides&, const T*,                       \
      const WindowTokenStrides&, const acc_type<T>*, const T*, const T*, const T*, double, T*, T*, T*,          \
      acc_type<T>*, acc_type<T>*, acc_type<T>*, acc_type<T>*, acc_type<T>*, cudaStream_t);

MEDMTL_INSTANTIATE_WINDOW_ATTENTION(float)
MEDMTL_INSTANTIATE_WINDOW_ATTENTION(double)
MEDMTL_INSTANTIATE_WINDOW_ATTENTION(__half)
MEDMTL_INSTANTIATE_WINDOW_ATTENTION(__nv_bfloat16)

#undef MEDMTL_INSTANTIATE_WINDOW_ATTENTION

}  // namespace cuda
}  // namespace medmtl
