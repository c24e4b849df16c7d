// Hierarchical navigable small world graph (Malkov & Yashunin; hnswlib's
// HierarchicalNSW) over unit vectors, similarity = dot product.
//
// Removal unlinks the node from its neighbours, bridging each neighbour to
// the removed node's other neighbours (FreshDiskANN-style local repair), and
// puts its slot on a free list; the next add reuses the slot with its level.
// Removed slots are never returned but may still be walked through until
// reused, so search stays connected without periodic rebuilds.
//
// search() keeps its scratch space thread_local, so concurrent searches
// share nothing and allocate nothing on the hot path.
#pragma once

#include <cstdlib>
#include <random>
#include <unordered_map>

#include "index/distance.hpp"
#include "index/index.hpp"

namespace attention_echo::index {

inline constexpr int kHnswMaxM = 64;  // bounds a search's per-node scratch

struct HnswOptions {
  int m = 16;                 // links per node on levels >= 1; 2*m on level 0 (2..kHnswMaxM)
  int ef_construction = 100;  // insertion beam width (>= 1)
  int ef_search = 12;         // search beam width up to 1e5 entries (>= 1; see search_key)
  std::uint64_t seed = 42;    // level draws: same graph for the same adds
};

// std::invalid_argument naming the option unless every field is in range.
void validate(const HnswOptions& options);

namespace detail {

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

}  // namespace detail

class HnswIndex final : public VectorIndex {
 public:
  explicit HnswIndex(int dim, HnswOptions options = {});

  std::size_t size() const override { return slot_of_.size(); }
  void remove(std::uint64_t id) override;
  void clear() override;
  void for_each(const EntryVisitor& f) const override;

 private:
  using Scored = std::pair<float, std::uint32_t>;  // (similarity, slot)
  static constexpr std::uint32_t kNone = ~std::uint32_t{0};

  void add_key(std::uint64_t id, const float* key) override;
  std::vector<Candidate> search_key(const float* query, int k,
                                    float min_similarity) const override;

  const float* key(std::uint32_t slot) const { return &keys_[std::size_t{slot} * dim()]; }
  int capacity(int level) const { return level == 0 ? 2 * options_.m : options_.m; }
  // [count, neighbour slots...] of `slot` on `level`.
  std::uint32_t* links(std::uint32_t slot, int level);
  const std::uint32_t* links(std::uint32_t slot, int level) const;

  // The graph operations take the dot kernel their public operation fetched.
  std::uint32_t new_slot();
  void connect(DotFn dot, std::uint32_t slot);
  void unlink(DotFn dot, std::uint32_t slot);
  void add_link(DotFn dot, std::uint32_t from, std::uint32_t to, int level);
  void select_neighbors(DotFn dot, std::vector<Scored>& candidates, int max_count) const;
  std::uint32_t greedy_descent(DotFn dot, const float* query, std::uint32_t entry, int from_level,
                               int to_level) const;
  std::vector<Scored> search_level(DotFn dot, const float* query, std::uint32_t entry, int level,
                                   int ef) const;

  HnswOptions options_;
  double level_scale_;
  std::mt19937_64 rng_;
  detail::HugeVector<float> keys_;            // slot-major, dim() floats per slot
  std::vector<std::uint64_t> ids_;            // slot -> id
  std::vector<std::uint8_t> live_;            // 0: removed (on free_) or being inserted
  std::vector<std::uint8_t> level_;           // top level of each slot
  detail::HugeVector<std::uint32_t> links0_;  // level 0 lists, 1 + 2m per slot
  std::vector<std::uint32_t> upper_at_;       // slot -> offset of its level >= 1 lists in upper_
  std::vector<std::uint32_t> upper_;          // levels 1..level_[slot], 1 + m each
  std::vector<std::uint32_t> free_;           // removed slots, reused by add
  std::unordered_map<std::uint64_t, std::uint32_t> slot_of_;  // live id -> slot
  std::uint32_t entry_ = kNone;
  int top_level_ = -1;
};

}  // namespace attention_echo::index
