// The CPU capability in force (cpu_capability.h), and the registration of
// that capability's copy of the CPU kernels with the dispatcher, at load.
#include "cpu_capability.h"

#include <torch/library.h>

#include <cctype>
#include <cstdlib>
#include <string>

// Whether setup.py compiled the avx2 and avx512 copies (x86-64 only).
#ifndef MEDMTL_CPU_CAPABILITIES_BUILT
#define MEDMTL_CPU_CAPABILITIES_BUILT 0
#endif

// Each kernel file's registration function, per capability:
// register_<name>(torch::Library&) registers the ops of csrc/cpu/<name>.cpp
// (relayout's for CompositeExplicitAutograd, the others' for CPU).
#define MEDMTL_CPU_KERNEL_FILES(X) \
  X(multi_dilation_conv_cpu)       \
  X(multiscale_pool_cpu)           \
  X(spatial_attention_cpu)         \
  X(window_attention_cpu)          \
  X(relayout_cpu)

namespace medmtl {

// (Inline namespaces, as the kernel files declare them; always called qualified.)
#define MEDMTL_DECLARE_REGISTER(name) void register_##name(torch::Library& m);
inline namespace cap_default {
MEDMTL_CPU_KERNEL_FILES(MEDMTL_DECLARE_REGISTER)
}
#if MEDMTL_CPU_CAPABILITIES_BUILT
inline namespace cap_avx2 {
MEDMTL_CPU_KERNEL_FILES(MEDMTL_DECLARE_REGISTER)
}
inline namespace cap_avx512 {
MEDMTL_CPU_KERNEL_FILES(MEDMTL_DECLARE_REGISTER)
}
#endif
#undef MEDMTL_DECLARE_REGISTER

const char* cpu_capability_name(CpuCapability capability) {
  switch (capability) {
    case CpuCapability::kAvx2: return "avx2";
    case CpuCapability::kAvx512: return "avx512";
    default: return "default";
  }
}

namespace {

CpuCapability best_supported() {
#if MEDMTL_CPU_CAPABILITIES_BUILT && (defined(__x86_64__) || defined(__i386__))
  // __builtin_cpu_supports also checks that the OS saves the AVX / AVX-512 state.
  __builtin_cpu_init();
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                    __builtin_cpu_supports("bmi2") && __builtin_cpu_supports("f16c");
  const bool avx512 = avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                      __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl") &&
                      __builtin_cpu_supports("avx512cd");
  return avx512 ? CpuCapability::kAvx512 : avx2 ? CpuCapability::kAvx2 : CpuCapability::kDefault;
#else
  return CpuCapability::kDefault;
#endif
}

CpuCapabilityChoice choose() {
  CpuCapabilityChoice c;
  c.supported = best_supported();
  c.in_force = c.supported;
  const char* env = std::getenv("MEDMTL_CPU_CAPABILITY");
  if (env == nullptr || env[0] == '\0') return c;
  std::string asked(env);
  for (char& ch : asked) ch = static_cast<char>(std::tolower(static_cast<unsigned char>(ch)));
  CpuCapability wanted;
  if (asked == "default") {
    wanted = CpuCapability::kDefault;
  } else if (asked == "avx2") {
    wanted = CpuCapability::kAvx2;
  } else if (asked == "avx512") {
    wanted = CpuCapability::kAvx512;
  } else {
    c.note = "MEDMTL_CPU_CAPABILITY=" + std::string(env) + " ignored (expected default, avx2 or avx512)";
    return c;
  }
  if (static_cast<int>(wanted) > static_cast<int>(c.supported)) {
    c.note = "MEDMTL_CPU_CAPABILITY=" + asked + " is more than this CPU (or build) supports";
    return c;
  }
  c.in_force = wanted;
  if (wanted != c.supported) c.note = "forced by MEDMTL_CPU_CAPABILITY=" + asked;
  return c;
}

// Registers the ops of csrc/cpu/<name>.cpp in the capability in force.
#define MEDMTL_REGISTER_IN_FORCE(name)                                              \
  switch (cpu_capability().in_force) {                                              \
    MEDMTL_REGISTER_CASES(name)                                                     \
    default: cap_default::register_##name(m); break;                                \
  }
#if MEDMTL_CPU_CAPABILITIES_BUILT
#define MEDMTL_REGISTER_CASES(name)                                                 \
  case CpuCapability::kAvx512: cap_avx512::register_##name(m); break;               \
  case CpuCapability::kAvx2: cap_avx2::register_##name(m); break;
#else
#define MEDMTL_REGISTER_CASES(name)
#endif

}  // namespace

const CpuCapabilityChoice& cpu_capability() {
  static const CpuCapabilityChoice choice = choose();
  return choice;
}

TORCH_LIBRARY_IMPL(medmtl, CPU, m) {
  MEDMTL_REGISTER_IN_FORCE(multi_dilation_conv_cpu)
  MEDMTL_REGISTER_IN_FORCE(multiscale_pool_cpu)
  MEDMTL_REGISTER_IN_FORCE(spatial_attention_cpu)
  MEDMTL_REGISTER_IN_FORCE(window_attention_cpu)
}

TORCH_LIBRARY_IMPL(medmtl, CompositeExplicitAutograd, m) { MEDMTL_REGISTER_IN_FORCE(relayout_cpu) }

}  // namespace medmtl
