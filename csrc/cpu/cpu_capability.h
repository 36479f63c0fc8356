// CPU capabilities: the CPU kernels (the translation units of setup.py's
// CPU_KERNEL_SOURCES) are compiled once per capability, as ATen's CPU kernels
// are: "default" for the portable baseline the whole extension is built for
// (x86-64-v2), "avx2" (AVX2 + FMA) and "avx512" (AVX-512 F/BW/DQ/VL/CD). A
// capability's copy lives in its own inline namespace (medmtl::cap_avx2, ...)
// and is compiled for its instructions by cpu_capability_target.h; at load,
// cpu_capability.cpp registers the ops of the best copy this CPU runs
// (MEDMTL_CPU_CAPABILITY=default|avx2|avx512 forces a lower one).
//
// setup.py builds a capability's copy from a generated file that defines
// MEDMTL_CPU_CAPABILITY and includes the kernel .cpp; the .cpp compiled
// directly is the default copy.
#pragma once

#include <string>

#ifndef MEDMTL_CPU_CAPABILITY
#define MEDMTL_CPU_CAPABILITY 0
#endif

#if MEDMTL_CPU_CAPABILITY == 0
#define MEDMTL_CPU_NS cap_default
#elif MEDMTL_CPU_CAPABILITY == 1
#define MEDMTL_CPU_NS cap_avx2
#elif MEDMTL_CPU_CAPABILITY == 2
#define MEDMTL_CPU_NS cap_avx512
#else
#error "MEDMTL_CPU_CAPABILITY must be 0 (default), 1 (avx2) or 2 (avx512)"
#endif

namespace medmtl {

enum class CpuCapability : int { kDefault = 0, kAvx2 = 1, kAvx512 = 2 };

// The capability whose kernels are registered, the best one this CPU (and
// this build) supports, and, when they differ or the environment asked for
// something else, why (empty otherwise). Decided once.
struct CpuCapabilityChoice {
  CpuCapability in_force = CpuCapability::kDefault;
  CpuCapability supported = CpuCapability::kDefault;
  std::string note;
};

const CpuCapabilityChoice& cpu_capability();
const char* cpu_capability_name(CpuCapability capability);

}  // namespace medmtl
