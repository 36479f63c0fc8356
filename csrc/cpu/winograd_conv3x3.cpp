// Dilated 3x3 convolutions ("same" padding) as Winograd F(4x4, 3x3) tiles,
// forward and backward.
//
// The math (Lavin & Gray 2016, interpolation points 0, +-1, +-2, inf): the
// 4x4 outputs Y of a 3x3 correlation g over a 6x6 input tile D are
//   Y = A^T [ (G g G^T) (.) (B^T D B) ] A,
// with (.) elementwise on the 36 transformed positions. Summed over input
// channels, position e's product is one GEMM over all tiles:
//   M_e (tiles x Cout) = V_e (tiles x Cin) U_e (Cin x Cout),
// V = B^T D B per tile and U = G g G^T per channel pair: 36 multiply-adds per
// 16 outputs instead of 144. A dilation d is the same convolution on each
// sub-grid r + d m of the positions: a tile's outputs are (y0 + d i, x0 + d j)
// for i, j < 4 and its inputs (y0 + d (i - 1), x0 + d (j - 1)) for i, j < 6,
// zero outside the map.
//
// The backward, for the same tiles:
// - grad_x is the forward convolution of the output gradient with the kernel
//   flipped and its channels swapped (grad_x[p] = sum_k grad[p - s_k] g_k);
// - grad_U_e = Q_e^T V_e, with Q = A dY A^T (the output transform's adjoint
//   on the gradient's 4x4 tile), and grad_g = G^T grad_U G.
//
// Each thread processes its blocks of tiles one at a time (transform, 36
// GEMMs, inverse transform), so a block's transformed tiles stay in its L2
// cache; the kernel gradient's threads split x's channels instead, each
// owning its columns of grad_U. With few tiles and a large kernel (the tiles'
// transformed values fewer than the kernel's), the tiles go in stages
// instead: all inputs transformed, the 36 GEMMs split among the threads, all
// outputs (convolve_in_stages), so the kernel is streamed once. Transformed
// kernels over 16 MB are made and used in slabs of channels, unless an
// inference weight's whole transform is kept between calls
// (derived_weight_cache.h). The transforms run over channels in vectors of
// kLanes (pixels are channels-last, explicitly vectorised with omp simd); the
// GEMMs are single-threaded calls to the BLAS ATen links.
#include "winograd_conv3x3.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <type_traits>
#include <vector>

#include "../core/dilated_taps.h"
#include "derived_weight_cache.h"

// Everything below is compiled per CPU capability (cpu_capability.h).
#include "cpu_capability_target.h"

namespace medmtl {
inline namespace MEDMTL_CPU_NS {
namespace {

constexpr int64_t kPoints = 36;     // transformed positions of a 6x6 tile
constexpr int64_t kLanes = 64;      // channels transformed together

// ---- 1-D transforms over n channels: the k-th vector of in (of out) starts
// at in + k in_step (out + k out_step).

// B^T d (6 -> 6): an input tile into the transformed domain.
template <typename T>
inline void input_1d(const T* __restrict in, int64_t in_step, T* __restrict out, int64_t out_step, int64_t n) {
#pragma omp simd
  for (int64_t c = 0; c < n; ++c) {
    const T d0 = in[c], d1 = in[c + in_step], d2 = in[c + 2 * in_step], d3 = in[c + 3 * in_step],
            d4 = in[c + 4 * in_step], d5 = in[c + 5 * in_step];
    out[c] = 4 * d0 - 5 * d2 + d4;
    out[c + out_step] = d3 + d4 - 4 * (d1 + d2);
    out[c + 2 * out_step] = 4 * (d1 - d2) + d4 - d3;
    out[c + 3 * out_step] = 2 * (d3 - d1) + d4 - d2;
    out[c + 4 * out_step] = 2 * (d1 - d3) + d4 - d2;
    out[c + 5 * out_step] = 4 * d1 - 5 * d3 + d5;
  }
}

// A^T m (6 -> 4): transformed products back to outputs.
template <typename T>
inline void output_1d(const T* __restrict in, int64_t in_step, T* __restrict out, int64_t out_step, int64_t n) {
#pragma omp simd
  for (int64_t c = 0; c < n; ++c) {
    const T m0 = in[c], m1 = in[c + in_step], m2 = in[c + 2 * in_step], m3 = in[c + 3 * in_step],
            m4 = in[c + 4 * in_step], m5 = in[c + 5 * in_step];
    const T s12 = m1 + m2, d12 = m1 - m2, s34 = m3 + m4, d34 = m3 - m4;
    out[c] = m0 + s12 + s34;
    out[c + out_step] = d12 + 2 * d34;
    out[c + 2 * out_step] = s12 + 4 * s34;
    out[c + 3 * out_step] = d12 + 8 * d34 + m5;
  }
}

// A q (4 -> 6): the adjoint of output_1d, for output gradients.
template <typename T>
inline void output_adjoint_1d(const T* __restrict in, int64_t in_step, T* __restrict out, int64_t out_step,
                              int64_t n) {
#pragma omp simd
  for (int64_t c = 0; c < n; ++c) {
    const T q0 = in[c], q1 = in[c + in_step], q2 = in[c + 2 * in_step], q3 = in[c + 3 * in_step];
    const T even = q0 + q2, odd = q1 + q3, even4 = q0 + 4 * q2, odd8 = 2 * q1 + 8 * q3;
    out[c] = q0;
    out[c + out_step] = even + odd;
    out[c + 2 * out_step] = even - odd;
    out[c + 3 * out_step] = even4 + odd8;
    out[c + 4 * out_step] = even4 - odd8;
    out[c + 5 * out_step] = q3;
  }
}

// G g (3 -> 6): a kernel into the transformed domain.
template <typename T>
inline void kernel_1d(const T* __restrict in, int64_t in_step, T* __restrict out, int64_t out_step, int64_t n) {
#pragma omp simd
  for (int64_t c = 0; c < n; ++c) {
    const T g0 = in[c], g1 = in[c + in_step], g2 = in[c + 2 * in_step];
    out[c] = g0 / 4;
    out[c + out_step] = -(g0 + g1 + g2) / 6;
    out[c + 2 * out_step] = -(g0 - g1 + g2) / 6;
    out[c + 3 * out_step] = g0 / 24 + g1 / 12 + g2 / 6;
    out[c + 4 * out_step] = g0 / 24 - g1 / 12 + g2 / 6;
    out[c + 5 * out_step] = g2;
  }
}

// G^T u (6 -> 3): the adjoint of kernel_1d, for the kernel's gradient.
template <typename T>
inline void kernel_adjoint_1d(const T* __restrict in, int64_t in_step, T* __restrict out, int64_t out_step,
                              int64_t n) {
#pragma omp simd
  for (int64_t c = 0; c < n; ++c) {
    const T u0 = in[c], u1 = in[c + in_step], u2 = in[c + 2 * in_step], u3 = in[c + 3 * in_step],
            u4 = in[c + 4 * in_step], u5 = in[c + 5 * in_step];
    out[c] = u0 / 4 - (u1 + u2) / 6 + (u3 + u4) / 24;
    out[c + out_step] = (u2 - u1) / 6 + (u3 - u4) / 12;
    out[c + 2 * out_step] = (u3 + u4 - u1 - u2) / 6 + u5;
  }
}

// ---- GEMMs on row-major matrices

}  // namespace
}  // namespace MEDMTL_CPU_NS
}  // namespace medmtl

// The BLAS that ATen links (MKL or OpenBLAS) exports the Fortran GEMMs; weak,
// so a build of torch without them falls back to ATen's mm.
extern "C" {
void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k, const float* alpha,
            const float* a, const int* lda, const float* b, const int* ldb, const float* beta, float* c,
            const int* ldc) __attribute__((weak));
void dgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k, const double* alpha,
            const double* a, const int* lda, const double* b, const int* ldb, const double* beta, double* c,
            const int* ldc) __attribute__((weak));
}

namespace medmtl {
inline namespace MEDMTL_CPU_NS {
namespace {

// C (m x n) = op(A) op(B) (+ C when accumulating), row-major with leading
// dimensions lda, ldb, ldc; op(A) is A^T when trans_a (A stored k x m), same
// for B. Single-threaded when called on one of ATen's threads.
template <typename T>
void gemm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, const T* A, int64_t lda, const T* B,
          int64_t ldb, T* C, int64_t ldc, bool accumulate) {
  // Row-major C is column-major C^T = op(B)^T op(A)^T: BLAS with the operands swapped.
  const char ta = trans_b ? 'T' : 'N', tb = trans_a ? 'T' : 'N';
  const int mi = static_cast<int>(n), ni = static_cast<int>(m), ki = static_cast<int>(k);
  const int la = static_cast<int>(ldb), lb = static_cast<int>(lda), lc = static_cast<int>(ldc);
  const T one = 1, beta = accumulate ? 1 : 0;
  if constexpr (std::is_same_v<T, float>) {
    if (sgemm_ != nullptr) return sgemm_(&ta, &tb, &mi, &ni, &ki, &one, B, &la, A, &lb, &beta, C, &lc);
  } else {
    if (dgemm_ != nullptr) return dgemm_(&ta, &tb, &mi, &ni, &ki, &one, B, &la, A, &lb, &beta, C, &lc);
  }
  const at::TensorOptions options = at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value);
  auto matrix = [&](const T* data, int64_t rows, int64_t cols, int64_t ld, bool trans) {
    const at::Tensor t = at::from_blob(const_cast<T*>(data), {trans ? cols : rows, trans ? rows : cols}, {ld, 1}, options);
    return trans ? t.t() : t;
  };
  at::Tensor c = at::from_blob(C, {m, n}, {ldc, 1}, options);
  const at::Tensor a = matrix(A, m, k, lda, trans_a), b = matrix(B, k, n, ldb, trans_b);
  if (accumulate)
    c.addmm_(a, b);
  else
    at::mm_out(c, a, b);
}

// ---- Pixels and tiles

// A (B, C, H, W) map whose channels are contiguous: pixel (b, y, x) starts at
// data + b sb + y sy + x sx.
template <typename T>
struct Pixels {
  T* data;
  int64_t H, W, C, sb, sy, sx;
  T* pixel(int64_t b, int64_t y, int64_t x) const { return data + b * sb + y * sy + x * sx; }
};

template <typename T>
Pixels<T> pixels_of(const at::Tensor& t) {
  return {static_cast<T*>(t.data_ptr()), t.size(2), t.size(3), t.size(1), t.stride(0), t.stride(2), t.stride(3)};
}

bool has_contiguous_channels(const at::Tensor& t) { return t.size(1) <= 1 || t.stride(1) == 1; }

at::Tensor with_contiguous_channels(const at::Tensor& t) {
  return has_contiguous_channels(t) ? t : t.contiguous(at::MemoryFormat::ChannelsLast);
}

// Origins along one axis of a dilation-d convolution's tiles: on each
// sub-grid r + d m of the positions, one tile every 4 of its positions.
std::vector<int64_t> tile_origins(int64_t length, int64_t d) {
  std::vector<int64_t> origins;
  for (int64_t r = 0; r < std::min(d, length); ++r)
    for (int64_t p = r; p < length; p += 4 * d) origins.push_back(p);
  return origins;
}

// The tiles of a batch of maps, numbered (b, row origin, column origin).
struct TileGrid {
  std::vector<int64_t> rows, cols;
  int64_t batch, d;
  TileGrid(int64_t batch_, int64_t H, int64_t W, int64_t d_)
      : rows(tile_origins(H, d_)), cols(tile_origins(W, d_)), batch(batch_), d(d_) {}
  int64_t count() const { return batch * static_cast<int64_t>(rows.size() * cols.size()); }
  // (b, y0, x0) of tile t
  void locate(int64_t t, int64_t& b, int64_t& y0, int64_t& x0) const {
    const int64_t per_image = static_cast<int64_t>(rows.size() * cols.size());
    b = t / per_image;
    const int64_t r = t % per_image;
    y0 = rows[r / cols.size()];
    x0 = cols[r % cols.size()];
  }
};

// Tiles are processed a block at a time by each thread: the block's
// transformed tiles (chunks of kChannelChunk channels at a time) and GEMM
// results stay in its L2 cache.
constexpr int64_t kChannelChunk = 128;
constexpr int64_t kBlockBytes = 1 << 20;
constexpr int64_t kMaxBlockTiles = 64, kMinBlockTiles = 16;
// Fewest tiles (in the batch) for which winograd_pays when the call
// transforms the kernel...
constexpr int64_t kMinTiles = 96;
// ... and when the kernel's transform is cached (derived_weight_cache.h),
// with the taps doing at least kCachedKernelRatio times Winograd's
// multiply-adds and at least kMinCachedKernelChannels channels each way.
constexpr int64_t kMinCachedKernelTiles = 32;
constexpr double kCachedKernelRatio = 2.5;
constexpr int64_t kMinCachedKernelChannels = 64;

// A transformed kernel is made and used in slabs of channels of at most this
// many bytes (the whole 1024 -> 256 one of the concat fuse at 28x28 is 37 MB).
constexpr int64_t kMaxSlabBytes = 16 << 20;
// A cached (derived_weight_cache.h) kernel transform is whole.
constexpr int64_t kForwardKernel = 1;

// Channels per slab of a transformed kernel with `other` channels on its other side.
int64_t slab_channels(int64_t channels, int64_t other, int64_t element_size) {
  const int64_t per_channel = kPoints * other * element_size;
  if (per_channel * channels <= kMaxSlabBytes) return channels;
  return std::max<int64_t>(16, kMaxSlabBytes / per_channel / 16 * 16);
}

// Tiles per block, with `values_per_tile` transformed values held per tile.
int64_t block_tiles(int64_t values_per_tile, int64_t element_size) {
  const int64_t fit = kBlockBytes / std::max<int64_t>(1, values_per_tile * element_size);
  return std::clamp(fit, kMinBlockTiles, kMaxBlockTiles);
}

// Runs fn(first, n, workspace) on all threads for the blocks [first, first +
// n) of `block` tiles; each thread gets a workspace of `workspace_size` values.
template <typename T, typename Fn>
void for_each_block(int64_t tiles, int64_t block, int64_t workspace_size, const at::TensorOptions& options,
                    const Fn& fn) {
  const int64_t blocks = (tiles + block - 1) / block;
  at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
    at::Tensor workspace = at::empty({workspace_size}, options);
    for (int64_t k = begin; k < end; ++k)
      fn(k * block, std::min(block, tiles - k * block), workspace.data_ptr<T>());
  });
}

// Copies the (extent x extent) tile of `in` with origin (y0, x0) shifted by
// `offset` taps, channels [c0, c0 + n), into buf[i][j][kLanes]; zero outside
// the map.
template <typename T>
void gather_tile(const Pixels<const T>& in, int64_t b, int64_t y0, int64_t x0, int64_t d, int64_t offset,
                 int64_t extent, int64_t c0, int64_t n, T* buf) {
  for (int64_t i = 0; i < extent; ++i) {
    const int64_t y = y0 + d * (i - offset);
    for (int64_t j = 0; j < extent; ++j) {
      const int64_t x = x0 + d * (j - offset);
      T* dst = buf + (i * extent + j) * kLanes;
      const bool inside = y >= 0 && y < in.H && x >= 0 && x < in.W;
      const T* src = inside ? in.pixel(b, y, x) + c0 : nullptr;
#pragma omp simd
      for (int64_t c = 0; c < n; ++c) dst[c] = inside ? src[c] : T(0);
    }
  }
}

// V[e] = (B^T D B)_e for channels [c_begin, c_end) of tile (b, y0, x0)'s 6x6
// input; V's positions e are `point_step` apart.
template <typename T>
void transform_input_tile(const Pixels<const T>& in, int64_t b, int64_t y0, int64_t x0, int64_t d, int64_t c_begin,
                          int64_t c_end, T* V, int64_t point_step) {
  T tile[kPoints * kLanes], half[kPoints * kLanes];
  const bool interior = y0 - d >= 0 && y0 + 4 * d < in.H && x0 - d >= 0 && x0 + 4 * d < in.W;
  for (int64_t c0 = c_begin; c0 < c_end; c0 += kLanes) {
    const int64_t n = std::min(kLanes, c_end - c0);
    T* v = V + (c0 - c_begin);
    if (interior) {  // the columns straight from the map
      for (int64_t j = 0; j < 6; ++j)
        input_1d(in.pixel(b, y0 - d, x0 + d * (j - 1)) + c0, d * in.sy, half + j * kLanes, 6 * kLanes, n);
    } else {
      gather_tile(in, b, y0, x0, d, /*offset=*/1, /*extent=*/6, c0, n, tile);
      for (int64_t j = 0; j < 6; ++j) input_1d(tile + j * kLanes, 6 * kLanes, half + j * kLanes, 6 * kLanes, n);
    }
    for (int64_t i = 0; i < 6; ++i) input_1d(half + i * 6 * kLanes, kLanes, v + i * 6 * point_step, point_step, n);
  }
}

// Q[e] = (A dY A^T)_e for the 4x4 output-gradient tile of tile (b, y0, x0).
template <typename T>
void transform_gradient_tile(const Pixels<const T>& grad, int64_t b, int64_t y0, int64_t x0, int64_t d, T* Q,
                             int64_t point_step) {
  T tile[16 * kLanes], half[24 * kLanes];
  for (int64_t c0 = 0; c0 < grad.C; c0 += kLanes) {
    const int64_t n = std::min(kLanes, grad.C - c0);
    gather_tile(grad, b, y0, x0, d, /*offset=*/0, /*extent=*/4, c0, n, tile);
    for (int64_t j = 0; j < 4; ++j)
      output_adjoint_1d(tile + j * kLanes, 4 * kLanes, half + j * kLanes, 4 * kLanes, n);
    for (int64_t i = 0; i < 6; ++i)
      output_adjoint_1d(half + i * 4 * kLanes, kLanes, Q + i * 6 * point_step + c0, point_step, n);
  }
}

// What is done with a tile's outputs: out = act(base + y), base = out's own
// values when accumulating, else the bias (or 0). Any non-finite value
// written sets *non_finite (see winograd_conv3x3_into).
template <typename T>
struct Epilogue {
  const T* bias;
  bool accumulate, relu;
  std::atomic<bool>* non_finite;
};

// Writes the 4x4 outputs A^T M A of tile (b, y0, x0) that lie in the map.
template <typename T>
void transform_output_tile(const T* M, int64_t point_step, const Pixels<T>& out, int64_t b, int64_t y0, int64_t x0,
                           int64_t d, const Epilogue<T>& epilogue) {
  T half[24 * kLanes], y[16 * kLanes];
  T probe[kLanes] = {};  // value * 0 summed: NaN once a value is NaN or infinite
  static constexpr T zeros[kLanes] = {};
  for (int64_t c0 = 0; c0 < out.C; c0 += kLanes) {
    const int64_t n = std::min(kLanes, out.C - c0);
    for (int64_t j = 0; j < 6; ++j) output_1d(M + j * point_step + c0, 6 * point_step, half + j * kLanes, 6 * kLanes, n);
    for (int64_t i = 0; i < 4; ++i) output_1d(half + i * 6 * kLanes, kLanes, y + i * 4 * kLanes, kLanes, n);
    for (int64_t i = 0; i < 4 && y0 + d * i < out.H; ++i)
      for (int64_t j = 0; j < 4 && x0 + d * j < out.W; ++j) {
        T* dst = out.pixel(b, y0 + d * i, x0 + d * j) + c0;
        const T* v = y + (i * 4 + j) * kLanes;
        const T* base = epilogue.accumulate ? dst : epilogue.bias != nullptr ? epilogue.bias + c0 : zeros;
        // Branch-free loops, so they vectorise.
        if (epilogue.relu) {
#pragma omp simd
          for (int64_t c = 0; c < n; ++c) {
            const T value = v[c] + base[c];
            dst[c] = value < 0 ? T(0) : value;  // keeps NaN, as torch.relu
            probe[c] += value * T(0);
          }
        } else {
#pragma omp simd
          for (int64_t c = 0; c < n; ++c) {
            const T value = v[c] + base[c];
            dst[c] = value;
            probe[c] += value * T(0);
          }
        }
      }
  }
  for (int64_t c = 0; c < kLanes; ++c)
    if (probe[c] != probe[c]) epilogue.non_finite->store(true, std::memory_order_relaxed);
}

// ---- Kernels

// The GEMMs' right operand U (36, K, N) = G g G^T for every channel pair of
// weight (Cout, Cin, 3, 3), any strides, read along Cin (which the DFE layer
// keeps innermost): the forward's (K = Cin, N = Cout), or with `rotated` the
// input gradient's (K = Cout, N = Cin) of the kernel rotated by 180 degrees.
template <typename T>
at::Tensor transform_weight(const at::Tensor& weight, bool rotated) {
  const int64_t cout = weight.size(0), cin = weight.size(1);
  const int64_t so = weight.stride(0), si = weight.stride(1), sy = weight.stride(2), sx = weight.stride(3);
  // The forward's rows are Cin: a block of kOutBlock output channels is
  // transformed along Cin, then written out transposed, kOutBlock at a time.
  constexpr int64_t kOutBlock = 16;
  const int64_t out_block = rotated ? 1 : kOutBlock;
  at::Tensor U = rotated ? at::empty({kPoints, cout, cin}, weight.options())
                         : at::empty({kPoints, cin, cout}, weight.options());
  const T* w = weight.const_data_ptr<T>();
  T* u = U.data_ptr<T>();
  const int64_t blocks = (cout + out_block - 1) / out_block;
  at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
    T g[9 * kLanes], half[18 * kLanes];
    std::vector<T> local(rotated ? 0 : kPoints * kOutBlock * kLanes);  // [e][o][c]
    for (int64_t block = begin; block < end; ++block)
      for (int64_t c0 = 0; c0 < cin; c0 += kLanes) {
        const int64_t n = std::min(kLanes, cin - c0);
        const int64_t o_begin = block * out_block, o_end = std::min(cout, o_begin + out_block);
        for (int64_t o = o_begin; o < o_end; ++o) {
          for (int64_t tap = 0; tap < 9; ++tap) {
            const int64_t ky = rotated ? 2 - tap / 3 : tap / 3, kx = rotated ? 2 - tap % 3 : tap % 3;
            const T* src = w + o * so + c0 * si + ky * sy + kx * sx;
            for (int64_t c = 0; c < n; ++c) g[tap * kLanes + c] = src[c * si];
          }
          for (int64_t kx = 0; kx < 3; ++kx)
            kernel_1d(g + kx * kLanes, 3 * kLanes, half + kx * kLanes, 3 * kLanes, n);
          for (int64_t i = 0; i < 6; ++i) {
            if (rotated)  // U[e][o][c0 + c]
              kernel_1d(half + i * 3 * kLanes, kLanes, u + (i * 6 * cout + o) * cin + c0, cout * cin, n);
            else  // local[e][o - o_begin][c]
              kernel_1d(half + i * 3 * kLanes, kLanes, local.data() + (i * 6 * kOutBlock + o - o_begin) * kLanes,
                        kOutBlock * kLanes, n);
          }
        }
        if (!rotated)  // U[e][c0 + c][o]
          for (int64_t e = 0; e < kPoints; ++e)
            for (int64_t c = 0; c < n; ++c) {
              T* dst = u + (e * cin + c0 + c) * cout + o_begin;
              for (int64_t o = 0; o < o_end - o_begin; ++o) dst[o] = local[(e * kOutBlock + o) * kLanes + c];
            }
      }
  });
  return U;
}

// The kernel's gradient (Cout, 3, 3, Cin) = G^T grad_U G from grad_U (36, Cout, Cin).
template <typename T>
at::Tensor kernel_gradient(const at::Tensor& grad_U) {
  const int64_t cout = grad_U.size(1), cin = grad_U.size(2);
  at::Tensor grad_w = at::empty({cout, 3, 3, cin}, grad_U.options());
  const T* gu = grad_U.const_data_ptr<T>();
  T* gw = grad_w.data_ptr<T>();
  at::parallel_for(0, cout, 1, [&](int64_t begin, int64_t end) {
    T half[18 * kLanes];
    for (int64_t o = begin; o < end; ++o)
      for (int64_t c0 = 0; c0 < cin; c0 += kLanes) {
        const int64_t n = std::min(kLanes, cin - c0);
        for (int64_t i = 0; i < 6; ++i)  // along the columns: half[i][kx]
          kernel_adjoint_1d(gu + (i * 6 * cout + o) * cin + c0, cout * cin, half + i * 3 * kLanes, kLanes, n);
        for (int64_t kx = 0; kx < 3; ++kx)  // along the rows: into grad_w[o][ky][kx]
          kernel_adjoint_1d(half + kx * kLanes, 3 * kLanes, gw + (o * 9 + kx) * cin + c0, 3 * cin, n);
      }
  });
  return grad_w;
}

// ---- The convolutions, a block of tiles at a time

// M (36, n, N) = sum over channel chunks of V_e (n, chunk) U_e[chunk] for the
// tiles [first, first + n): the transformed products of a K -> N convolution.
template <typename T>
void transformed_products(const TileGrid& grid, const Pixels<const T>& in, const T* U, int64_t N, int64_t first,
                          int64_t n, T* V, T* M) {
  const int64_t K = in.C;
  for (int64_t c0 = 0; c0 < K; c0 += kChannelChunk) {
    const int64_t chunk = std::min(kChannelChunk, K - c0);
    for (int64_t k = 0; k < n; ++k) {
      int64_t b, y0, x0;
      grid.locate(first + k, b, y0, x0);
      transform_input_tile(in, b, y0, x0, grid.d, c0, c0 + chunk, V + k * chunk, n * chunk);
    }
    for (int64_t e = 0; e < kPoints; ++e)
      gemm<T>(false, false, n, N, chunk, V + e * n * chunk, chunk, U + (e * K + c0) * N, N, M + e * n * N, N,
              c0 > 0);
  }
}

// out = epilogue(conv(in)) with U (36, K, N) from transform_weight, all tiles
// in stages: every tile's transformed input V (36, tiles, K), then the 36
// GEMMs split among the threads, then every tile's outputs. For few tiles and
// many channels (a dense 2048 -> 512 on 2 x 14 x 14: 32 tiles, a 151 MB U),
// where the per-block scheme would stream U once per block of tiles.
template <typename T>
void convolve_in_stages(const TileGrid& grid, const Pixels<const T>& in, const T* U, const Pixels<T>& out,
                        const Epilogue<T>& epilogue, const at::TensorOptions& options) {
  const int64_t tiles = grid.count(), K = in.C, N = out.C;
  at::Tensor V = at::empty({kPoints, tiles, K}, options), M = at::empty({kPoints, tiles, N}, options);
  T *v = V.data_ptr<T>(), *m = M.data_ptr<T>();
  at::parallel_for(0, tiles, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      int64_t b, y0, x0;
      grid.locate(t, b, y0, x0);
      transform_input_tile(in, b, y0, x0, grid.d, 0, K, v + t * K, tiles * K);
    }
  });
  at::parallel_for(0, kPoints, 1, [&](int64_t begin, int64_t end) {
    for (int64_t e = begin; e < end; ++e)
      gemm<T>(false, false, tiles, N, K, v + e * tiles * K, K, U + e * K * N, N, m + e * tiles * N, N, false);
  });
  at::parallel_for(0, tiles, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      int64_t b, y0, x0;
      grid.locate(t, b, y0, x0);
      transform_output_tile(m + t * N, tiles * N, out, b, y0, x0, grid.d, epilogue);
    }
  });
}

// out = epilogue(conv(in)) with U (36, K, N) from transform_weight: a block of
// tiles at a time per thread when U is smaller than the tiles' transformed
// inputs and outputs (it is then read once per block, from cache), else in
// stages (convolve_in_stages).
template <typename T>
void convolve(const Pixels<const T>& in, const T* U, const Pixels<T>& out, int64_t d, const Epilogue<T>& epilogue,
              int64_t batch, const at::TensorOptions& options) {
  const TileGrid grid(batch, in.H, in.W, d);
  const int64_t K = in.C, N = out.C, chunk = std::min(K, kChannelChunk);
  if (K * N > grid.count() * (K + N)) return convolve_in_stages(grid, in, U, out, epilogue, options);
  const int64_t block = block_tiles(kPoints * (chunk + N), sizeof(T));
  for_each_block<T>(grid.count(), block, kPoints * block * (chunk + N), options,
                    [&](int64_t first, int64_t n, T* workspace) {
                      T *V = workspace, *M = workspace + kPoints * block * chunk;
                      transformed_products(grid, in, U, N, first, n, V, M);
                      for (int64_t k = 0; k < n; ++k) {
                        int64_t b, y0, x0;
                        grid.locate(first + k, b, y0, x0);
                        transform_output_tile(M + k * N, n * N, out, b, y0, x0, d, epilogue);
                      }
                    });
}

// grad_U (36, Cout, Cin) = sum over the tiles of Q_e^T V_e, for x (Cin
// channels) and its convolution's output gradient g (Cout): the kernel's
// gradient before kernel_gradient. The threads split x's channels (each owns
// its columns of grad_U, so no partial sums are stored) and each transforms
// the gradient tiles itself.
template <typename T>
at::Tensor transformed_kernel_gradient(const Pixels<const T>& g, const Pixels<const T>& x, int64_t d, int64_t batch,
                                       const at::TensorOptions& options) {
  const TileGrid grid(batch, x.H, x.W, d);
  const int64_t tiles = grid.count(), cin = x.C, cout = g.C;
  const int64_t threads = at::get_num_threads();
  // Channel pieces: at most kChannelChunk wide, at least one per thread, in whole vectors.
  const int64_t width = std::min(kChannelChunk, std::max<int64_t>(16, ((cin + threads - 1) / threads + 15) / 16 * 16));
  const int64_t pieces = (cin + width - 1) / width;
  const int64_t block = block_tiles(kPoints * (width + cout), sizeof(T));
  at::Tensor grad_U = at::empty({kPoints, cout, cin}, options);
  T* gu = grad_U.data_ptr<T>();
  at::parallel_for(0, pieces, 1, [&](int64_t begin, int64_t end) {
    at::Tensor workspace = at::empty({kPoints * block * (width + cout)}, options);
    T *V = workspace.data_ptr<T>(), *Q = V + kPoints * block * width;
    for (int64_t piece = begin; piece < end; ++piece) {
      const int64_t c0 = piece * width, columns = std::min(width, cin - c0);
      for (int64_t first = 0; first < tiles; first += block) {
        const int64_t n = std::min(block, tiles - first);
        for (int64_t k = 0; k < n; ++k) {
          int64_t b, y0, x0;
          grid.locate(first + k, b, y0, x0);
          transform_gradient_tile(g, b, y0, x0, d, Q + k * cout, n * cout);
          transform_input_tile(x, b, y0, x0, d, c0, c0 + columns, V + k * columns, n * columns);
        }
        for (int64_t e = 0; e < kPoints; ++e)
          gemm<T>(true, false, cout, columns, n, Q + e * n * cout, cout, V + e * n * columns, columns,
                  gu + e * cout * cin + c0, cin, first > 0);
      }
    }
  });
  return grad_U;
}

void check_operands(const at::Tensor& x, const at::Tensor& weight, int64_t dilation) {
  TORCH_CHECK(x.dim() == 4 && weight.dim() == 4 && weight.size(2) == 3 && weight.size(3) == 3 &&
                  weight.size(1) == x.size(1) && dilation >= 1 && weight.scalar_type() == x.scalar_type(),
              "winograd_conv3x3: expected x (B, Cin, H, W), weight (Cout, Cin, 3, 3) of x's dtype and a dilation "
              ">= 1, got x ", x.sizes(), ", weight ", weight.sizes(), ", dilation ", dilation);
}

// Multiply-adds per output channel pair of a 3x3 convolution at dilation d on
// a batch of H x W maps: as direct taps (each tap over the positions where it
// reads the map), and as Winograd tiles (36 per tile).
struct MultiplyAdds {
  int64_t direct, winograd;
};

MultiplyAdds multiply_adds(int64_t batch, int64_t height, int64_t width, int64_t dilation) {
  int64_t direct = 0;
  for (int64_t ky = 0; ky < 3; ++ky)
    for (int64_t kx = 0; kx < 3; ++kx) {
      const int64_t dy = core::tap_shift(ky, dilation), dx = core::tap_shift(kx, dilation);
      direct += std::max<int64_t>(0, core::tap_output_end(dy, height) - core::tap_output_begin(dy, height)) *
                std::max<int64_t>(0, core::tap_output_end(dx, width) - core::tap_output_begin(dx, width));
    }
  const int64_t tiles =
      static_cast<int64_t>(tile_origins(height, dilation).size() * tile_origins(width, dilation).size());
  return {batch * direct, batch * tiles * kPoints};
}

bool winograd_dtype(at::ScalarType dtype) { return dtype == at::kFloat || dtype == at::kDouble; }

}  // namespace

bool winograd_pays(int64_t batch, int64_t height, int64_t width, int64_t dilation, at::ScalarType dtype) {
  if (!winograd_enabled() || !winograd_dtype(dtype) || dilation < 1 || batch < 1) return false;
  const MultiplyAdds mads = multiply_adds(batch, height, width, dilation);
  // Measured on 2 cores against oneDNN (forward, 64-512 channels): 1.2-2x
  // faster where the taps do at least 3x Winograd's multiply-adds (a dense
  // 3x3 on 56x56 or more, dilation 6 on 112x112); even or slower below that
  // (dilations 12 and 18 on 112x112, where 9-12 tile rows cover 112 rows, and
  // 6, 12, 18 on 56x56: 0.75-1.0x). Every call transforms the kernel (4x its
  // size), which takes enough tiles to pay off: with 98 in stages (a dense
  // 2 x 28 x 28), 1024 -> 256 and 512 -> 512 channels were 1.0-1.2x oneDNN's
  // speed forward and 1.0-1.3x forward + backward, 256 -> 256 1.3x both.
  return 3 * mads.winograd <= mads.direct && mads.winograd >= kMinTiles * kPoints;
}

bool winograd_pays_with_cached_kernel(int64_t batch, int64_t height, int64_t width, int64_t dilation,
                                      at::ScalarType dtype, int64_t in_channels, int64_t out_channels) {
  if (!winograd_enabled() || !winograd_dtype(dtype) || dilation < 1 || batch < 1) return false;
  const MultiplyAdds mads = multiply_adds(batch, height, width, dilation);
  // Without the kernel's transform, fewer tiles pay: a dense 1024 -> 256 on
  // 2 x 28 x 28 (98 tiles) took 10 ms against oneDNN's 22, a dense 2048 ->
  // 512 on 2 x 14 x 14 (32 tiles, 2.8x fewer multiply-adds) 16-19 ms against
  // the tap GEMMs' 28. The tiles' transforms cost per channel what a GEMM
  // does per channel pair, so few channels do not pay; and a transform the
  // cache cannot hold would be made on every call.
  const int64_t transform_bytes = kPoints * in_channels * out_channels * static_cast<int64_t>(c10::elementSize(dtype));
  return kCachedKernelRatio * static_cast<double>(mads.winograd) <= static_cast<double>(mads.direct) &&
         mads.winograd >= kMinCachedKernelTiles * kPoints &&
         std::min(in_channels, out_channels) >= kMinCachedKernelChannels &&
         transform_bytes <= derived_weight_cache_budget();
}

bool winograd_conv3x3_into(const at::Tensor& x_in, const at::Tensor& weight, int64_t dilation,
                           const std::optional<at::Tensor>& bias, bool accumulate, bool relu, at::Tensor& out,
                           bool cache_kernel) {
  check_operands(x_in, weight, dilation);
  TORCH_CHECK(out.dim() == 4 && out.size(0) == x_in.size(0) && out.size(1) == weight.size(0) &&
                  out.size(2) == x_in.size(2) && out.size(3) == x_in.size(3) && has_contiguous_channels(out) &&
                  out.scalar_type() == x_in.scalar_type(),
              "winograd_conv3x3_into: out must be (B, Cout, H, W) with contiguous channels, got ", out.sizes());
  if (out.numel() == 0) return true;
  const at::Tensor x = with_contiguous_channels(x_in);
  std::atomic<bool> non_finite{false};
  const at::Tensor b = bias.has_value() && !accumulate ? bias->contiguous() : at::Tensor();
  const int64_t cin = x.size(1), cout = out.size(1);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "winograd_conv3x3_into", [&] {
    auto run = [&](const at::Tensor& U, int64_t o0, int64_t width) {
      const Epilogue<scalar_t> epilogue{b.defined() ? b.const_data_ptr<scalar_t>() + o0 : nullptr, accumulate, relu,
                                        &non_finite};
      convolve(pixels_of<const scalar_t>(x), U.const_data_ptr<scalar_t>(), pixels_of<scalar_t>(out.narrow(1, o0, width)),
               dilation, epilogue, x.size(0), x.options());
    };
    const int64_t transform_bytes = kPoints * cin * cout * static_cast<int64_t>(sizeof(scalar_t));
    if (cache_kernel && weight_cacheable(weight) && transform_bytes <= derived_weight_cache_budget()) {
      // The whole transformed kernel, made once.
      const at::Tensor U = cached_derived_weight(weight, kForwardKernel, [&] {
        return transform_weight<scalar_t>(weight, /*rotated=*/false);
      });
      return run(U, 0, cout);
    }
    const int64_t slab = slab_channels(cout, cin, sizeof(scalar_t));
    for (int64_t o0 = 0; o0 < cout; o0 += slab) {  // output channels [o0, o0 + width)
      const int64_t width = std::min(slab, cout - o0);
      run(transform_weight<scalar_t>(weight.narrow(0, o0, width), /*rotated=*/false), o0, width);
    }
  });
  return !non_finite.load();
}

std::tuple<at::Tensor, at::Tensor, bool> winograd_conv3x3_backward(const at::Tensor& grad_in,
                                                                   const at::Tensor& x_in, const at::Tensor& weight,
                                                                   int64_t dilation) {
  check_operands(x_in, weight, dilation);
  const at::Tensor x = with_contiguous_channels(x_in), grad = with_contiguous_channels(grad_in);
  at::Tensor grad_x, grad_weight;
  std::atomic<bool> non_finite{false};
  const int64_t cin = x.size(1), cout = grad.size(1);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "winograd_conv3x3_backward", [&] {
    const Pixels<const scalar_t> g = pixels_of<const scalar_t>(grad);
    const int64_t slab = slab_channels(cin, cout, sizeof(scalar_t));  // of x's channels
    // The kernel's gradient first: its transformed sums are freed before
    // grad_x and the rotated kernel are allocated (a lower peak).
    at::Tensor grad_w = at::empty({cout, 3, 3, cin}, x.options());
    for (int64_t c0 = 0; c0 < cin; c0 += slab) {
      const int64_t width = std::min(slab, cin - c0);
      const at::Tensor grad_U = transformed_kernel_gradient(g, pixels_of<const scalar_t>(x.narrow(1, c0, width)),
                                                            dilation, x.size(0), x.options());
      grad_w.narrow(3, c0, width).copy_(kernel_gradient<scalar_t>(grad_U));
    }
    grad_weight = grad_w.permute({0, 3, 1, 2});
    // grad_x: the gradient convolved with the rotated kernel, Cout -> Cin.
    grad_x = at::empty(x.sizes(), x.options().memory_format(at::MemoryFormat::ChannelsLast));
    for (int64_t c0 = 0; c0 < cin; c0 += slab) {
      const int64_t width = std::min(slab, cin - c0);
      const at::Tensor U_rotated = transform_weight<scalar_t>(weight.narrow(1, c0, width), /*rotated=*/true);
      convolve(g, U_rotated.const_data_ptr<scalar_t>(), pixels_of<scalar_t>(grad_x.narrow(1, c0, width)), dilation,
               Epilogue<scalar_t>{nullptr, false, false, &non_finite}, x.size(0), x.options());
    }
  });
  return {grad_x, grad_weight, !non_finite.load() && at::isfinite(grad_weight).all().item<bool>()};
}

}  // namespace MEDMTL_CPU_NS

#if MEDMTL_CPU_CAPABILITY == 0  // one switch, defined in the default copy, read by every copy
namespace {
std::atomic<bool>& winograd_switch() {
  static std::atomic<bool> enabled{[] {
    const char* value = std::getenv("MEDMTL_WINOGRAD");
    return value == nullptr || std::string(value) != "0";
  }()};
  return enabled;
}
}  // namespace

bool winograd_enabled() { return winograd_switch().load(std::memory_order_relaxed); }

void set_winograd_enabled(bool enabled) { winograd_switch().store(enabled, std::memory_order_relaxed); }
#endif

}  // namespace medmtl
