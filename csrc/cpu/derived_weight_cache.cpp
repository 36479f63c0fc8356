#include "derived_weight_cache.h"

#include <c10/core/StorageImpl.h>
#include <c10/util/intrusive_ptr.h>

#include <algorithm>
#include <cstdlib>
#include <mutex>
#include <vector>

namespace medmtl {
namespace {

// The kind of a sighting entry: no derived tensor, the record that a weight was seen.
constexpr int64_t kSighting = -1;

// What identifies a weight's values: its storage (held weakly, so an entry
// never keeps a weight alive), where in it and how it is laid out, the
// version counter's value when the entry was made, and a copy of its values
// then (snapshot): a write the version counter does not see (through `.data`,
// as an EMA update does, or a raw pointer) changes the values, so an entry is
// used only when the weight still equals its snapshot, which proves the
// derived tensor current.
struct WeightKey {
  c10::weak_intrusive_ptr<c10::StorageImpl> alive;
  const c10::StorageImpl* storage;
  const void* data;
  int64_t offset;
  std::vector<int64_t> sizes, strides;
  at::ScalarType dtype;
  int64_t version;
  int64_t kind;
  at::Tensor snapshot;  // the weight's values when the entry was made (undefined in a lookup key)
  const at::Tensor* weight = nullptr;  // the weight itself (a lookup key only)

  // A key to look `weight` up with (no copy made).
  static WeightKey of(const at::Tensor& weight, int64_t kind) {
    return {weight.storage().getWeakStorageImpl(),
            weight.storage().unsafeGetStorageImpl(),
            weight.storage().data(),
            weight.storage_offset(),
            weight.sizes().vec(),
            weight.strides().vec(),
            weight.scalar_type(),
            weight._version(),
            kind,
            at::Tensor(),
            &weight};
  }

  // The key an entry keeps: with `snapshot`, the weight's values taken
  // before the derived tensor was made from them (a sighting needs none: it
  // only decides to cache, and what is cached is derived later).
  WeightKey stored(const at::Tensor& values) const {
    WeightKey key = *this;
    key.snapshot = values;
    key.weight = nullptr;
    return key;
  }

  bool expired() const { return alive.expired(); }

  // Same weight, unchanged: same slot, data and version, and (the proof) the
  // same values as the entry's snapshot. Both storages are alive (expired
  // entries are purged first, and the caller holds the other's weight), so
  // equal addresses are the same storage.
  bool matches(const WeightKey& lookup) const {
    if (!same_slot(lookup) || data != lookup.data || version != lookup.version) return false;
    return kind == kSighting || (snapshot.defined() && lookup.weight != nullptr && at::equal(snapshot, *lookup.weight));
  }

  // Same weight slot (perhaps written since): its entry is replaced.
  bool same_slot(const WeightKey& other) const {
    return storage == other.storage && offset == other.offset && sizes == other.sizes && strides == other.strides &&
           dtype == other.dtype && kind == other.kind;
  }
};

// A derived tensor, or (value undefined, kind kSighting) the record that a
// weight was seen.
struct Entry {
  WeightKey key;
  at::Tensor value;
  int64_t bytes;
  uint64_t last_use;
};

struct Cache {
  std::mutex mutex;
  std::vector<Entry> entries;
  uint64_t clock = 0;

  void purge_expired() {
    entries.erase(std::remove_if(entries.begin(), entries.end(), [](const Entry& e) { return e.key.expired(); }),
                  entries.end());
  }

  // The live entry of this unchanged weight, marked as used now; null if none.
  Entry* find(const WeightKey& key) {
    purge_expired();
    for (Entry& e : entries)
      if (e.key.matches(key)) {
        e.last_use = ++clock;
        return &e;
      }
    return nullptr;
  }

  // Puts an entry (with `snapshot`, the weight's values that `value` was
  // derived from) in place of any for the same weight slot, and drops those
  // of the same storage at another version (stale once it was written).
  void insert(const WeightKey& key, const at::Tensor& snapshot, const at::Tensor& value, int64_t bytes) {
    purge_expired();
    entries.erase(std::remove_if(entries.begin(), entries.end(),
                                 [&](const Entry& e) {
                                   return e.key.same_slot(key) ||
                                          (e.key.storage == key.storage && e.key.version != key.version);
                                 }),
                  entries.end());
    while (this->bytes() + bytes > derived_weight_cache_budget()) {  // the least recently used derived tensor goes
      auto oldest = entries.end();
      for (auto e = entries.begin(); e != entries.end(); ++e)
        if (e->value.defined() && (oldest == entries.end() || e->last_use < oldest->last_use)) oldest = e;
      if (oldest == entries.end()) break;  // only sightings (0 bytes) left: nothing to drop
      entries.erase(oldest);
    }
    entries.push_back({key.stored(snapshot), value, bytes, ++clock});
  }

  int64_t bytes() const {
    int64_t total = 0;
    for (const Entry& e : entries) total += e.bytes;
    return total;
  }
};

Cache& cache() {
  static Cache* instance = new Cache();  // never destroyed: used until exit
  return *instance;
}

}  // namespace

int64_t derived_weight_cache_budget() {
  static const int64_t budget = [] {
    const char* mb = std::getenv("MEDMTL_WEIGHT_CACHE_MB");
    return mb != nullptr ? std::max<int64_t>(0, std::atoll(mb)) << 20 : kDerivedWeightCacheBytes;
  }();
  return budget;
}

bool weight_cacheable(const at::Tensor& weight) {
  return derived_weight_cache_budget() > 0 && weight.device().is_cpu() && !weight.requires_grad() &&
         !weight.is_inference() && weight.has_storage();
}

bool weight_seen_before(const at::Tensor& weight) {
  Cache& c = cache();
  std::lock_guard<std::mutex> lock(c.mutex);
  if (!weight_cacheable(weight)) {
    c.purge_expired();  // a layer back in training frees its eval fold: its transforms go now
    return false;
  }
  const WeightKey key = WeightKey::of(weight, kSighting);
  if (c.find(key) != nullptr) return true;
  c.insert(key, at::Tensor(), at::Tensor(), 0);
  return false;
}

at::Tensor cached_derived_weight(const at::Tensor& weight, int64_t kind, const std::function<at::Tensor()>& derive) {
  if (!weight_cacheable(weight)) return derive();
  const WeightKey key = WeightKey::of(weight, kind);
  Cache& c = cache();
  {
    std::lock_guard<std::mutex> lock(c.mutex);
    if (const Entry* hit = c.find(key)) return hit->value;
  }
  // Derived outside the lock (it may run on all threads); another thread may
  // derive the same weight meanwhile, and the later insert replaces the other.
  // The snapshot is taken first: were the weight written meanwhile, the entry
  // would hold the old values and never match the new ones.
  const at::Tensor snapshot = weight.clone();
  at::Tensor value = derive();
  const int64_t bytes = static_cast<int64_t>(value.nbytes());
  if (bytes > derived_weight_cache_budget()) return value;
  std::lock_guard<std::mutex> lock(c.mutex);
  c.insert(key, snapshot, value, bytes);
  return value;
}

std::pair<int64_t, int64_t> derived_weight_cache_size() {
  Cache& c = cache();
  std::lock_guard<std::mutex> lock(c.mutex);
  c.purge_expired();
  const int64_t derived =
      std::count_if(c.entries.begin(), c.entries.end(), [](const Entry& e) { return e.value.defined(); });
  return {derived, c.bytes()};
}

}  // namespace medmtl
