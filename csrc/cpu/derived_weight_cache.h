// Tensors derived from a weight (a Winograd kernel transform), kept between
// calls while the weight does not change: inference calls the same ops with
// the same folded weights, so their transform is made once instead of on
// every call.
//
// An entry is used only while the weight's storage is alive, at the same
// address, offset, sizes, strides and dtype, with the version counter it had
// (every in-place write through the weight or a view of it bumps it), and
// with the same values: each entry keeps a copy of the weight (a quarter of
// a Winograd transform's bytes, not counted in the budget) and a hit compares
// the weight with it, so writes that bypass the version counter (through
// `.data`, as a mean-teacher EMA update does, or raw pointers) are seen too;
// the comparison reads the weight once, several times less work than the
// transform it saves. Only weights that take no
// gradient are cached, and only once they are seen a second time, so neither
// training (whose weights change every step) nor weights made afresh on every
// call fill the cache. The entries take at most kDerivedWeightCacheBytes (or
// MEDMTL_WEIGHT_CACHE_MB megabytes, 0 to disable), least recently used
// dropped first, and an entry goes with its weight's storage.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <functional>

namespace medmtl {

constexpr int64_t kDerivedWeightCacheBytes = int64_t{1} << 30;

// Whether derivations of `weight` are cached: it takes no gradient, is not an
// inference tensor (those have no version counter), the cache is enabled,
// and the weight is on the CPU.
bool weight_cacheable(const at::Tensor& weight);

// Whether `weight` (weight_cacheable) was passed here before and has not
// changed since: an inference weight that calls reuse. Records this call, so
// a weight made afresh on every call (a fold inside a compiled graph) never
// has its derivations cached. Every call (any weight) also drops the entries
// of weights that are gone.
bool weight_seen_before(const at::Tensor& weight);

// derive(), which depends only on `weight` and `kind` (one id per kind of
// derivation), from the cache when an earlier call made it for the same,
// unchanged weight; derived and cached (when weight_cacheable) otherwise.
at::Tensor cached_derived_weight(const at::Tensor& weight, int64_t kind, const std::function<at::Tensor()>& derive);

// The number of derived tensors held and their bytes (for tests).
std::pair<int64_t, int64_t> derived_weight_cache_size();

// The most bytes the entries take (0: nothing is cached).
int64_t derived_weight_cache_budget();

}  // namespace medmtl
