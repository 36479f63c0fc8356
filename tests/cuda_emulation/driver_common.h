// What every emulation driver (driver*.cpp) exports to its test through ctypes
// (tests/cuda_emulation_build.py, EmulatedLibrary): emu_reset() before a run
// (seeds the thread order, clears the pending error, its message and the
// launch log), emu_error() (what went wrong in the last failed launch) and
// emu_log() (one line per launch: kernel, grid x y z, block x y z); and the
// dispatch of the drivers' dtype codes to the launchers' template argument.
//
// It defines these extern "C" functions: include it once per shared library
// (in its driver, after cuda_emu.h).
#pragma once

#include <cstdint>

#include "cuda_emu.h"

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

EMU_EXPORT void emu_reset(uint64_t seed) {
  emu::rng().seed(seed);
  emu::pending_error() = cudaSuccess;
  emu::error_message().clear();
  emu::launch_log().clear();
}

EMU_EXPORT const char* emu_error() { return emu::error_message().c_str(); }
EMU_EXPORT const char* emu_log() { return emu::launch_log().c_str(); }
