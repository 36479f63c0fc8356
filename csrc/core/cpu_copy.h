// The CPU kernels are compiled once per CPU capability (csrc/cpu/cpu_capability.h,
// which defines MEDMTL_CPU_NS). The core headers whose loops they run
// (softmax_exp.h, multiscale_pool.h, adaptive_bins.h) are included there after
// the capability's target pragma and wrap their functions in these macros, so
// that each copy has its own functions, compiled for its instructions, which
// the linker cannot swap for another copy's. Elsewhere (CUDA, the C++ tests)
// the macros are empty. Include such a core header in a CPU kernel file only
// after cpu_capability_target.h.
#pragma once

#ifdef MEDMTL_CPU_NS
#define MEDMTL_CORE_CPU_COPY_BEGIN inline namespace MEDMTL_CPU_NS {
#define MEDMTL_CORE_CPU_COPY_END }
#else
#define MEDMTL_CORE_CPU_COPY_BEGIN
#define MEDMTL_CORE_CPU_COPY_END
#endif
