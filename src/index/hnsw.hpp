// Internal pieces of SemanticIndex (defined in semantic_index.cpp), exposed
// for tests and benchmarks: the SIMD dot product, the HNSW graph used above
// the brute-force size threshold, and the tuning hook that lowers that
// threshold.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <random>
#include <unordered_map>
#include <vector>

#include "index/semantic_index.hpp"

namespace attention_echo::index::detail {

// Dot product of two dim-float vectors; AVX-512, AVX2+FMA or scalar, picked
// once at startup from the running CPU.
float dot(const float* a, const float* b, int dim);

struct HnswParams {
  int m = 16;                // links per node on levels >= 1; 2*m on level 0 (<= 64)
  int ef_construction = 100;
  int ef_search = 12;        // search beam width up to 1e5 entries (see search())
  std::uint64_t seed = 42;   // level draws: same graph for the same adds
};

struct IndexTuning {
  // A SemanticIndex scans exactly up to this many entries and switches to
  // HNSW above it; it switches back below half of it (hysteresis, so an
  // index sitting at the threshold does not rebuild on every add/remove).
  // Measured (dim 128, AVX-512): brute force and HNSW tie at ~500 entries;
  // at 1000 brute force takes ~12 us, HNSW ~6 us. Up to here exactness wins.
  std::size_t hnsw_threshold = 1024;
  HnswParams hnsw;
};

// The tuning a SemanticIndex copies when constructed. Tests and benchmarks
// change it; the library never does.
IndexTuning index_tuning();
void set_index_tuning(const IndexTuning& tuning);

// std::allocator that asks for transparent huge pages on large blocks. The
// graph reads keys and lists at random over hundreds of MB; with 4 KiB pages
// nearly every key read is also a TLB miss.
template <class T>
struct HugePageAllocator {
  using value_type = T;
  HugePageAllocator() = default;
  template <class U>
  HugePageAllocator(const HugePageAllocator<U>&) {}
  T* allocate(std::size_t n);
  void deallocate(T* p, std::size_t) { std::free(p); }
  bool operator==(const HugePageAllocator&) const = default;
};

template <class T>
using HugeVector = std::vector<T, HugePageAllocator<T>>;

// Hierarchical navigable small world graph (Malkov & Yashunin; hnswlib's
// algorithm) over unit vectors, similarity = dot product.
//
// Removal unlinks the node from its neighbours, bridging each neighbour to
// the removed node's other neighbours (FreshDiskANN-style local repair), and
// puts its slot on a free list; the next add reuses the slot with its level.
// Removed slots are never returned but may still be walked through until
// reused, so search stays connected without periodic rebuilds.
//
// Writers (add/remove) need external exclusion; search() is const and safe
// to run concurrently with other searches (scratch space is thread_local).
class Hnsw {
 public:
  Hnsw(int dim, HnswParams params);

  std::size_t size() const { return slot_of_.size(); }
  void add(std::uint64_t id, const float* key);  // an existing id is replaced
  void remove(std::uint64_t id);                  // unknown id: no-op
  std::vector<Candidate> search(const float* query, int k, float min_similarity) const;

  template <class F>  // f(id, key) for every entry
  void for_each(F&& f) const {
    for (const auto& [id, slot] : slot_of_) f(id, key(slot));
  }

 private:
  using Scored = std::pair<float, std::uint32_t>;  // (similarity, slot)
  static constexpr std::uint32_t kNone = ~std::uint32_t{0};
  static constexpr int kMaxM = 64;  // bounds a search's per-node scratch

  const float* key(std::uint32_t slot) const { return &keys_[std::size_t{slot} * dim_]; }
  int capacity(int level) const { return level == 0 ? 2 * p_.m : p_.m; }
  // [count, neighbour slots...] of `slot` on `level`.
  std::uint32_t* links(std::uint32_t slot, int level);
  const std::uint32_t* links(std::uint32_t slot, int level) const;

  std::uint32_t new_slot();
  void connect(std::uint32_t slot);
  void unlink(std::uint32_t slot);
  void add_link(std::uint32_t from, std::uint32_t to, int level);
  void select_neighbors(std::vector<Scored>& candidates, int max_count) const;
  std::uint32_t greedy_descent(const float* query, std::uint32_t entry, int from_level,
                               int to_level) const;
  std::vector<Scored> search_level(const float* query, std::uint32_t entry, int level,
                                   int ef) const;

  int dim_;
  HnswParams p_;
  double level_scale_;
  std::mt19937_64 rng_;
  HugeVector<float> keys_;               // slot-major, dim_ floats per slot
  std::vector<std::uint64_t> ids_;       // slot -> id
  std::vector<std::uint8_t> live_;       // 0: removed (on free_) or being inserted
  std::vector<std::uint8_t> level_;      // top level of each slot
  HugeVector<std::uint32_t> links0_;     // level 0 lists, 1 + 2m per slot
  std::vector<std::uint32_t> upper_at_;  // slot -> offset of its level >= 1 lists in upper_
  std::vector<std::uint32_t> upper_;     // levels 1..level_[slot], 1 + m each
  std::vector<std::uint32_t> free_;      // removed slots, reused by add
  std::unordered_map<std::uint64_t, std::uint32_t> slot_of_;  // live id -> slot
  std::uint32_t entry_ = kNone;
  int top_level_ = -1;
};

}  // namespace attention_echo::index::detail
