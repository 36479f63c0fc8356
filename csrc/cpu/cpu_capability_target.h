// Include last, after every other header of a CPU kernel translation unit:
// everything defined after it is compiled for the instructions of
// MEDMTL_CPU_CAPABILITY (cpu_capability.h). The headers before it keep the
// baseline's (so their inline functions, which the linker may share between
// the copies, never need a newer CPU); they still inline into the kernels'
// loops, which then vectorise with the capability's instructions. No arch or
// tune is set here: GCC inlines across targets only when those match.
#include "cpu_capability.h"

#if MEDMTL_CPU_CAPABILITY == 1
#pragma GCC target("avx,avx2,fma,f16c,bmi,bmi2,lzcnt,popcnt,movbe")
#elif MEDMTL_CPU_CAPABILITY == 2
#pragma GCC target("avx,avx2,fma,f16c,bmi,bmi2,lzcnt,popcnt,movbe,avx512f,avx512cd,avx512bw,avx512dq,avx512vl")
#endif
