// What every emulation driver (driver*.cpp) exports to its test through ctypes
// (tests/cuda_emulation_build.py, EmulatedLibrary): emu_reset() before a run
// (seeds the thread order, clears the pending error, its message and the
// launch log), emu_error() (what went wrong in the last failed launch) and
// emu_log() (one line per launch: kernel, grid x y z, block x y z); and the
// dispatch of the drivers' dtype codes to the launchers' template argument.
//
// write_plan() flattens the launch plans of csrc/cuda/launch_plan.h (the
// buffers the torch wrappers allocate and how they reduce them) for the test
// (tests/cuda_emulation_plan.py), which allocates and reduces as they say.
//
// It defines these extern "C" functions: include it once per shared library
// (in its driver, after cuda_emu.h).
#pragma once

#include <cstdint>

#include "cuda_emu.h"
#include "launch_plan.h"

#define EMU_EXPORT extern "C" __attribute__((visibility("default")))

// dtype: 0 float, 1 double, 2 __half, 3 __nv_bfloat16; returns fn<T>(...), or -1 for
// another code.
#define EMU_DISPATCH(dtype, fn, ...)               \
  switch (dtype) {                                 \
    case 0: return fn<float>(__VA_ARGS__);         \
    case 1: return fn<double>(__VA_ARGS__);        \
    case 2: return fn<__half>(__VA_ARGS__);        \
    case 3: return fn<__nv_bfloat16>(__VA_ARGS__); \
    default: return -1;                            \
  }

// Fields of one PlanBuffer in write_plan's output (tests/cuda_emulation_plan.py reads them).
constexpr int kPlanFields = 4 + 3 * medmtl::cuda::kPlanMaxRank + 1;

// buffers -> out[kPlanFields * i ...]: element rank sizes[5] zero_fill sum_dims
// result_rank result_sizes[5] result_order[5].
inline void write_plan(std::initializer_list<medmtl::cuda::PlanBuffer> buffers, int64_t* out) {
  for (const medmtl::cuda::PlanBuffer& b : buffers) {
    int64_t* o = out;
    *o++ = static_cast<int64_t>(b.element);
    *o++ = b.rank;
    for (int64_t s : b.sizes) *o++ = s;
    *o++ = b.zero_fill;
    *o++ = b.sum_dims;
    *o++ = b.result_rank;
    for (int64_t s : b.result_sizes) *o++ = s;
    for (int64_t s : b.result_order) *o++ = s;
    out += kPlanFields;
  }
}

EMU_EXPORT void emu_reset(uint64_t seed) {
  emu::rng().seed(seed);
  emu::pending_error() = cudaSuccess;
  emu::error_message().clear();
  emu::launch_log().clear();
}

EMU_EXPORT const char* emu_error() { return emu::error_message().c_str(); }
EMU_EXPORT const char* emu_log() { return emu::launch_log().c_str(); }
