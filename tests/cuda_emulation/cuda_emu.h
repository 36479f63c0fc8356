// CPU emulation of the CUDA features used by csrc/cuda/multiscale_pool_kernel.cu,
// so that tests/test_multiscale_pool_cuda_emulated.py can compile the kernels
// with g++ (no nvcc, no GPU) and compare them with the CPU op.
//
// What it emulates:
//  - kernel launches `k<<<grid, block, shmem, stream>>>(args)`, which the test
//    rewrites (in a copy of the .cu) to `::emu::launch("k", k, grid, block,
//    shmem, stream)(args)`. The launch configuration is checked like CUDA does
//    (every grid dimension >= 1, grid.y/z <= 65535, at most 1024 threads, no
//    dynamic shared memory); an invalid launch sets the error that
//    cudaGetLastError() then returns (and clears), like an invalid launch on a
//    GPU. Arguments are converted to the kernel's parameter types.
//  - threadIdx / blockIdx / blockDim / gridDim, __shared__ (a function-local
//    static: one copy, shared by the threads of the block that runs),
//    __syncthreads() and __shfl_down_sync(0xffffffff, v, delta) within warps
//    of 32 threads.
//  - The threads of a block are cooperative fibers (ucontext) on the calling
//    thread: a thread runs until it reaches a barrier (__syncthreads or a
//    shuffle) or returns, then another runnable thread runs, picked per block
//    either at random or by random warp priorities (a warp runs ahead of the
//    others as far as its barriers allow); see run_block. The choices come from
//    a seeded generator (emu_reset), so a run is reproducible, and code that
//    relies on an order between threads without a barrier gets to see other
//    orders. The blocks of a grid run one at a time, in a random order too.
//  - Barrier misuse is an error of the launch, not a hang: a __syncthreads()
//    that not every thread of the block reaches (or threads waiting at
//    different __syncthreads calls), or a shuffle that not all 32 lanes of a
//    warp reach, fails the launch with a description.
//
// What it does NOT emulate:
//  - real concurrency: no two threads (or blocks) ever run at the same time, so
//    races between barriers are only seen at barrier granularity, and never
//    between blocks (no atomics are emulated either; the kernels use none);
//  - the memory model (visibility, fences, __restrict__ / __ldg aliasing,
//    coalescing), shared-memory bank conflicts and capacity, register limits
//    and __launch_bounds__ (ignored), occupancy, timing, streams (launches are
//    synchronous, the stream is ignored);
//  - device arithmetic: float math is the host's (the test builds with
//    -ffp-contract=off, while nvcc contracts a * b + c to an FMA by default),
//    and __half / __nv_bfloat16 use the host code of cuda_fp16.h / cuda_bf16.h;
//  - out-of-bounds accesses (the test surrounds the buffers with guard zones to
//    catch stray writes, and poisons the zones around inputs so stray reads
//    most likely show as NaN), uninitialized shared memory (__shared__ arrays
//    keep whatever the previous block left in them), warps narrower than 32,
//    partial shuffle masks, 2-D/3-D blocks, any other intrinsic or runtime API
//    (using one fails the g++ build, which links with -z defs).
//
// Include it, before the kernel source, in exactly one translation unit (it
// defines cudaGetLastError).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>
#include <ucontext.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <memory>
#include <random>
#include <sstream>
#include <string>
#include <tuple>
#include <type_traits>
#include <vector>

#undef __global__
#undef __device__
#undef __host__
#undef __forceinline__
#undef __shared__
#undef __launch_bounds__
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __shared__ static
#define __launch_bounds__(...)

// Built-in variables: globals that the scheduler sets before it resumes a thread.
inline uint3 threadIdx, blockIdx;
inline dim3 blockDim, gridDim;

namespace emu {

constexpr unsigned kWarp = 32;
constexpr size_t kStackBytes = 128 * 1024;
constexpr size_t kStackGuardBytes = 512;  // bottom of each stack, checked after each block
constexpr unsigned char kStackGuard = 0xA5;
constexpr uint64_t kMaxBlocksPerLaunch = 1u << 22;  // an emulation limit, not a CUDA one

enum class State { kRunnable, kAtSync, kAtShuffle, kDone };

struct Fiber {
  ucontext_t context;
  std::unique_ptr<unsigned char[]> stack;
  State state = State::kRunnable;
  int site = 0;             // source line of the barrier it waits at
  uint64_t shuffles = 0;    // shuffles done so far (picks the slot buffer)
};

// The state of the block being run.
struct Block {
  std::vector<Fiber> fibers;  // grows to the largest block run so far (stacks are reused)
  unsigned threads = 0;       // threads of the block being run: fibers[0 .. threads)
  ucontext_t scheduler;
  unsigned current = 0;
  void (*body)(void*) = nullptr;
  void* body_arg = nullptr;
  std::string error;  // set by a thread that misuses an intrinsic
  // Shuffle slots: [parity of the shuffle][thread], double-buffered so that a
  // lane that runs ahead to the next shuffle does not overwrite a value that a
  // lagging lane still has to read.
  std::vector<unsigned char> slots[2];
  static constexpr size_t kSlotBytes = 16;
};

inline Block& block() {
  static Block b;
  return b;
}

inline std::mt19937_64& rng() {
  static std::mt19937_64 r(0);
  return r;
}

inline uint64_t& seed() {
  static uint64_t s = 0;
  return s;
}

inline cudaError_t& pending_error() {
  static cudaError_t e = cudaSuccess;
  return e;
}

inline std::string& error_message() {
  static std::string m;
  return m;
}

inline std::string& launch_log() {
  static std::string log;
  return log;
}

inline uint64_t& blocks_run() {
  static uint64_t n = 0;
  return n;
}

inline void fail(cudaError_t code, const std::string& message) {
  if (pending_error() == cudaSuccess) {
    pending_error() = code;
    error_message() = message;
  }
}

// Back to the scheduler (from a thread of the block).
inline void yield_to_scheduler() {
  Block& b = block();
  swapcontext(&b.fibers[b.current].context, &b.scheduler);
}

inline void fiber_entry() {
  Block& b = block();
  b.body(b.body_arg);
  b.fibers[b.current].state = State::kDone;
  yield_to_scheduler();  // never resumed
}

inline void sync_threads(int site) {
  Block& b = block();
  Fiber& f = b.fibers[b.current];
  f.state = State::kAtSync;
  f.site = site;
  yield_to_scheduler();
}

template <typename T>
T shfl_down_sync(unsigned mask, T value, unsigned delta, int site) {
  static_assert(std::is_trivially_copyable_v<T> && sizeof(T) <= Block::kSlotBytes);
  Block& b = block();
  const unsigned t = threadIdx.x, lane = t % kWarp;
  Fiber& f = b.fibers[t];
  if (mask != 0xffffffffu) {
    b.error = "__shfl_down_sync with a partial mask (not emulated), line " + std::to_string(site);
    f.state = State::kDone;
    yield_to_scheduler();
  }
  unsigned char* slots = b.slots[f.shuffles % 2].data();
  ++f.shuffles;
  std::memcpy(slots + t * Block::kSlotBytes, &value, sizeof(T));
  f.state = State::kAtShuffle;
  f.site = site;
  yield_to_scheduler();  // resumed once every lane of the warp has stored its value
  T out = value;         // lanes with lane + delta >= 32 keep their own value
  if (lane + delta < kWarp) std::memcpy(&out, slots + (t + delta) * Block::kSlotBytes, sizeof(T));
  return out;
}

inline std::string describe_threads(const Block& b) {
  std::ostringstream os;
  const char* names[] = {"runnable", "at __syncthreads", "at a shuffle", "returned"};
  for (unsigned t = 0; t < b.threads; ++t) {
    const Fiber& f = b.fibers[t];
    if (t > 0 && f.state == b.fibers[t - 1].state && f.site == b.fibers[t - 1].site) continue;
    unsigned last = t;
    while (last + 1 < b.threads && b.fibers[last + 1].state == f.state &&
           b.fibers[last + 1].site == f.site)
      ++last;
    os << " threads " << t << "-" << last << ": " << names[static_cast<int>(f.state)];
    if (f.state == State::kAtSync || f.state == State::kAtShuffle) os << " (line " << f.site << ")";
    os << ";";
  }
  return os.str();
}

// Runs one block of `threads` threads; returns an error description or "".
//
// Scheduling: one runnable thread at a time runs until its next barrier. A warp
// is released as soon as its 32 lanes have reached their shuffle, the block as
// soon as all its threads have reached the __syncthreads. Which runnable thread
// goes next is, per block, either uniformly random or by random priorities with
// the threads of a warp together (a warp then runs ahead of the lower warps as
// far as its barriers let it: that exposes a missing __syncthreads between
// warps that read and write the same shared memory).
inline std::string run_block(unsigned threads, void (*body)(void*), void* arg) {
  Block& b = block();
  if (b.fibers.size() < threads) b.fibers.resize(threads);
  b.threads = threads;
  for (auto& s : b.slots) s.assign(threads * Block::kSlotBytes, 0);
  b.body = body;
  b.body_arg = arg;
  b.error.clear();
  for (unsigned t = 0; t < threads; ++t) {
    Fiber& f = b.fibers[t];
    if (!f.stack) {
      f.stack.reset(new unsigned char[kStackBytes]);
      std::memset(f.stack.get(), kStackGuard, kStackGuardBytes);
    }
    f.state = State::kRunnable;
    f.site = 0;
    f.shuffles = 0;
    getcontext(&f.context);
    f.context.uc_stack.ss_sp = f.stack.get();
    f.context.uc_stack.ss_size = kStackBytes;
    f.context.uc_link = nullptr;
    makecontext(&f.context, fiber_entry, 0);
  }

  const bool by_priority = rng()() & 1;
  std::vector<uint64_t> priority(threads);
  {
    std::vector<uint64_t> warp_priority(threads / kWarp);
    for (auto& p : warp_priority) p = rng()() << 32;
    for (unsigned t = 0; t < threads; ++t)
      priority[t] = warp_priority[t / kWarp] | (rng()() & 0xffffffffu);
  }
  auto lower = [&](unsigned a, unsigned c) { return priority[a] < priority[c]; };
  std::vector<unsigned> ready;
  auto make_ready = [&](unsigned t) {
    b.fibers[t].state = State::kRunnable;
    ready.push_back(t);
    if (by_priority) std::push_heap(ready.begin(), ready.end(), lower);
  };
  auto take = [&]() {
    if (by_priority) {
      std::pop_heap(ready.begin(), ready.end(), lower);
    } else {
      std::swap(ready[rng()() % ready.size()], ready.back());
    }
    const unsigned t = ready.back();
    ready.pop_back();
    return t;
  };
  for (unsigned t = 0; t < threads; ++t) make_ready(t);

  std::vector<unsigned> at_shuffle(threads / kWarp, 0);
  unsigned at_sync = 0, done = 0;
  while (!ready.empty()) {
    const unsigned t = take();
    b.current = t;
    threadIdx = uint3{t, 0, 0};
    swapcontext(&b.scheduler, &b.fibers[t].context);
    if (!b.error.empty()) return b.error;
    const Fiber& f = b.fibers[t];
    if (f.state == State::kDone) {
      ++done;
    } else if (f.state == State::kAtShuffle) {
      const unsigned w = t / kWarp;
      if (++at_shuffle[w] == kWarp) {
        at_shuffle[w] = 0;
        for (unsigned l = 0; l < kWarp; ++l)
          if (b.fibers[w * kWarp + l].site != f.site)
            return "the lanes of warp " + std::to_string(w) + " are at different shuffles:" +
                   describe_threads(b);
        for (unsigned l = 0; l < kWarp; ++l) make_ready(w * kWarp + l);
      }
    } else if (f.state == State::kAtSync) {
      if (++at_sync == threads) {
        at_sync = 0;
        for (unsigned u = 0; u < threads; ++u)
          if (b.fibers[u].site != f.site)
            return "the threads are at different __syncthreads:" + describe_threads(b);
        for (unsigned u = 0; u < threads; ++u) make_ready(u);
      }
    }
  }
  if (done != threads)
    return "deadlock: a barrier that not all threads reach (__syncthreads must be reached by "
           "every thread of the block, a shuffle by every lane of the warp):" +
           describe_threads(b);
  for (unsigned t = 0; t < threads; ++t)
    for (size_t i = 0; i < kStackGuardBytes; ++i)
      if (b.fibers[t].stack[i] != kStackGuard)
        return "stack overflow in thread " + std::to_string(t) + " (emulated stacks are " +
               std::to_string(kStackBytes) + " bytes)";
  return "";
}

template <typename Kernel>
struct Launch;

template <typename... P>
struct Launch<void (*)(P...)> {
  const char* name;
  void (*kernel)(P...);
  dim3 grid, block;
  size_t shared_bytes;

  void operator()(P... args) const {
    std::ostringstream log;
    log << name << " " << grid.x << " " << grid.y << " " << grid.z << " " << block.x << " "
        << block.y << " " << block.z << "\n";
    launch_log() += log.str();
    const uint64_t threads = uint64_t(block.x) * block.y * block.z;
    const uint64_t blocks = uint64_t(grid.x) * grid.y * grid.z;
    std::string where = std::string(" (launch of ") + name + ")";
    if (grid.x == 0 || grid.y == 0 || grid.z == 0 || threads == 0 || grid.x > 2147483647u ||
        grid.y > 65535 || grid.z > 65535 || threads > 1024 || block.x > 1024 || block.y > 1024 ||
        block.z > 64)
      return fail(cudaErrorInvalidConfiguration, "invalid launch configuration" + where);
    if (shared_bytes != 0)
      return fail(cudaErrorInvalidValue, "dynamic shared memory is not emulated" + where);
    if (block.y != 1 || block.z != 1 || block.x % kWarp != 0)
      return fail(cudaErrorInvalidValue,
                  "the emulation runs 1-D blocks of whole warps only" + where);
    if (blocks > kMaxBlocksPerLaunch)
      return fail(cudaErrorInvalidValue, "grid too large for the emulation" + where);
    auto call = std::make_tuple(kernel, args...);
    auto body = [](void* p) {
      auto& c = *static_cast<decltype(call)*>(p);
      std::apply([](auto k, auto... a) { k(a...); }, c);
    };
    std::vector<uint64_t> order(blocks);
    for (uint64_t i = 0; i < blocks; ++i) order[i] = i;
    std::shuffle(order.begin(), order.end(), rng());
    blockDim = block;
    gridDim = grid;
    for (uint64_t linear : order) {
      blockIdx = uint3{unsigned(linear % grid.x), unsigned(linear / grid.x % grid.y),
                       unsigned(linear / grid.x / grid.y)};
      ++blocks_run();
      const std::string error = run_block(block.x, body, &call);
      if (!error.empty()) {
        std::ostringstream os;
        os << error << " [block (" << blockIdx.x << ", " << blockIdx.y << ", " << blockIdx.z
           << ")" << where << "]";
        return fail(cudaErrorLaunchFailure, os.str());
      }
    }
  }
};

template <typename... P>
Launch<void (*)(P...)> launch(const char* name, void (*kernel)(P...), dim3 grid, dim3 block,
                              size_t shared_bytes = 0, cudaStream_t = nullptr) {
  return {name, kernel, grid, block, shared_bytes};
}

}  // namespace emu

#define __syncthreads() ::emu::sync_threads(__LINE__)
#define __shfl_down_sync(mask, value, delta) ::emu::shfl_down_sync(mask, value, delta, __LINE__)

extern "C" cudaError_t CUDARTAPI cudaGetLastError(void) {
  const cudaError_t e = emu::pending_error();
  emu::pending_error() = cudaSuccess;
  return e;
}
