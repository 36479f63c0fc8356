// C entry points (for ctypes) to the host launchers of the CUDA kernels of
// medmtl::multiscale_pool, compiled with g++ against the CPU emulation of
// cuda_emu.h. tests/test_multiscale_pool_cuda_emulated.py builds it into a
// shared library together with a copy of csrc/cuda/multiscale_pool_kernel.cu in
// which the `<<<...>>>` launches are rewritten to emu::launch(...), and compares
// what the launchers compute with the CPU op.
//
// What it does: fills a MultiscalePoolLevel from a flat int64 array and calls
// multiscale_pool_backward_workspace / launch_multiscale_pool_forward /
// launch_multiscale_pool_backward<T> on host pointers, the way the torch wrapper
// csrc/cuda/multiscale_pool_cuda.cpp does on device pointers, for T = float,
// double, __half, __nv_bfloat16. Launch errors come back as the launchers'
// cudaError_t (0 = success), with emu_error() saying what went wrong; every
// launch is logged (emu_log()) so that the test can check which paths ran.
// emu_selftest() runs small kernels that check the emulation itself.
//
// The buffers the wrapper allocates and the sums of the grad_scale / grad_shift
// partials come from the wrapper's own launch plan (csrc/cuda/launch_plan.h,
// emu_backward_plan), which the test allocates and reduces as it says.
//
// What it does not do: the torch wrapper's input checks and dtype dispatch;
// no device memory, no streams (all on the host,
// synchronously); see cuda_emu.h for what the emulation leaves out.
#include "cuda_emu.h"
// emu_reset, emu_error, emu_log; EMU_EXPORT, EMU_DISPATCH.
#include "driver_common.h"
// The kernels under test (the rewritten copy; on the include path).
#include "multiscale_pool_kernel.cu"

namespace {

using namespace medmtl::cuda;

// g: batch channels depth height width spatial_dims num_sizes bins_per_channel out_row level_col
MultiscalePoolLevel make_level(const int64_t* g, const int64_t* sizes, const int64_t* size_offset) {
  MultiscalePoolLevel l;
  l.batch = g[0];
  l.channels = g[1];
  l.depth = g[2];
  l.height = g[3];
  l.width = g[4];
  l.spatial_dims = static_cast<int>(g[5]);
  l.num_sizes = g[6];
  l.bins_per_channel = g[7];
  l.out_row = g[8];
  l.level_col = g[9];
  l.sizes = sizes;
  l.size_offset = size_offset;
  return l;
}

template <typename T>
int forward(const MultiscalePoolLevel& l, const void* x, const void* scale, const void* shift,
            int relu, int is_max, void* out) {
  return launch_multiscale_pool_forward<T>(l, static_cast<const T*>(x), static_cast<const T*>(scale),
                                           static_cast<const T*>(shift), relu != 0, is_max != 0,
                                           static_cast<T*>(out), nullptr);
}

template <typename T>
int backward(const MultiscalePoolLevel& l, const void* grad_output, const void* x, const void* scale,
             const void* shift, int relu, int is_max, void* grad_x, void* grad_scale_partial,
             void* grad_shift_partial, void* argmax, void* grad_scratch) {
  using A = acc_type<T>;
  return launch_multiscale_pool_backward<T>(
      l, static_cast<const T*>(grad_output), static_cast<const T*>(x), static_cast<const T*>(scale),
      static_cast<const T*>(shift), relu != 0, is_max != 0, static_cast<T*>(grad_x),
      static_cast<A*>(grad_scale_partial), static_cast<A*>(grad_shift_partial),
      static_cast<int64_t*>(argmax), static_cast<A*>(grad_scratch), nullptr);
}

// --- Self-test kernels (checks of the emulation, not of medmtl) -------------

// Sum of threadIdx.x over the block, through shared memory and shuffles.
__global__ void selftest_block_sum(int64_t* out) {
  __shared__ int64_t partial[32];
  int64_t v = threadIdx.x;
  for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);
  if (threadIdx.x % 32 == 0) partial[threadIdx.x / 32] = v;
  __syncthreads();
  if (threadIdx.x == 0) {
    int64_t s = 0;
    for (unsigned w = 0; w < blockDim.x / 32; ++w) s += partial[w];
    out[blockIdx.y * gridDim.x + blockIdx.x] = s;
  }
}

// __syncthreads in a branch that only some threads take.
__global__ void selftest_divergent_sync(int64_t* out) {
  if (threadIdx.x < 40) __syncthreads();
  out[0] = 1;
}

// Thread 0 reads what the other threads wrote, without a barrier: a race.
__global__ void selftest_missing_sync(int64_t* out) {
  __shared__ int64_t seen[64];
  seen[threadIdx.x] = blockIdx.x + 1;
  if (threadIdx.x == 0) {
    int64_t n = 0;
    for (unsigned t = 0; t < blockDim.x; ++t) n += seen[t] == blockIdx.x + 1;
    out[blockIdx.x] = n;
  }
}

}  // namespace

EMU_EXPORT uint64_t emu_blocks_run() { return emu::blocks_run(); }

// res: partials_per_plane, argmax_elements, grad_elements.
EMU_EXPORT void emu_workspace(const int64_t* g, const int64_t* sizes, const int64_t* size_offset,
                              int is_max, int64_t* res) {
  const MultiscalePoolBackwardWorkspace ws =
      multiscale_pool_backward_workspace(make_level(g, sizes, size_offset), is_max != 0);
  res[0] = ws.partials_per_plane;
  res[1] = ws.argmax_elements;
  res[2] = ws.grad_elements;
}

// The wrapper's buffers of a level's backward (launch_plan.h), in the
// launcher's order: grad_scale_partial grad_shift_partial argmax grad_scratch.
EMU_EXPORT void emu_backward_plan(const int64_t* g, const int64_t* sizes, const int64_t* size_offset, int is_max,
                                  int64_t* out) {
  const MultiscalePoolLevel l = make_level(g, sizes, size_offset);
  const MultiscalePoolBackwardWorkspace ws = multiscale_pool_backward_workspace(l, is_max != 0);
  const MultiscalePoolBackwardPlan p = multiscale_pool_backward_plan(l.batch, l.channels, ws.partials_per_plane,
                                                                     ws.argmax_elements, ws.grad_elements);
  write_plan({p.grad_scale_partial, p.grad_shift_partial, p.argmax, p.grad_scratch}, out);
}

// dtype: see EMU_DISPATCH.
EMU_EXPORT int emu_forward(int dtype, const int64_t* g, const int64_t* sizes,
                           const int64_t* size_offset, const void* x, const void* scale,
                           const void* shift, int relu, int is_max, void* out) {
  const MultiscalePoolLevel l = make_level(g, sizes, size_offset);
  EMU_DISPATCH(dtype, forward, l, x, scale, shift, relu, is_max, out)
}

EMU_EXPORT int emu_backward(int dtype, const int64_t* g, const int64_t* sizes,
                            const int64_t* size_offset, const void* grad_output, const void* x,
                            const void* scale, const void* shift, int relu, int is_max,
                            void* grad_x, void* grad_scale_partial, void* grad_shift_partial,
                            void* argmax, void* grad_scratch) {
  const MultiscalePoolLevel l = make_level(g, sizes, size_offset);
  EMU_DISPATCH(dtype, backward, l, grad_output, x, scale, shift, relu, is_max, grad_x,
               grad_scale_partial, grad_shift_partial, argmax, grad_scratch)
}

// which: 0 block sum on a (3, 2) grid of 96 threads (out: 6 values),
// 1 divergent __syncthreads (must fail), 2 missing barrier on 8 blocks of 64
// threads (out: 8 counts, some below 64 if the thread order varies),
// 3 invalid configuration (an empty grid, must fail). Returns the launch status.
EMU_EXPORT int emu_selftest(int which, int64_t* out) {
  switch (which) {
    case 0: ::emu::launch("selftest_block_sum", selftest_block_sum, dim3(3, 2), dim3(96))(out); break;
    case 1: ::emu::launch("selftest_divergent_sync", selftest_divergent_sync, dim3(1), dim3(64))(out); break;
    case 2: ::emu::launch("selftest_missing_sync", selftest_missing_sync, dim3(8), dim3(64))(out); break;
    case 3: ::emu::launch("selftest_block_sum", selftest_block_sum, dim3(0, 1), dim3(32))(out); break;
    default: return -1;
  }
  return cudaGetLastError();
}
