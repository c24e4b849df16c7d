#include "index/hnsw_index.hpp"

#include <sys/mman.h>

#include <algorithm>
#include <cmath>
#include <functional>
#include <limits>
#include <stdexcept>
#include <string>

namespace attention_echo::index {
namespace {

// Per-thread visited marks and candidate heap, so a const search allocates
// nothing on the hot path and concurrent searches share nothing. A slot is
// visited when its mark equals the current epoch; bumping the epoch clears
// all marks at once.
struct Scratch {
  std::vector<std::uint16_t> mark;
  std::uint16_t epoch = 0;
  std::vector<std::pair<float, std::uint32_t>> candidates;

  void begin(std::size_t slots) {
    if (mark.size() < slots) mark.resize(slots, 0);
    if (++epoch == 0) {
      std::fill(mark.begin(), mark.end(), 0);
      epoch = 1;
    }
  }
  bool visit(std::uint32_t slot) {
    if (mark[slot] == epoch) return false;
    mark[slot] = epoch;
    return true;
  }
};

thread_local Scratch scratch;

void prefetch(const void* p) { __builtin_prefetch(p, 0, 3); }  // prefetcht0

}  // namespace

void validate(const HnswOptions& options) {
  using std::to_string;
  if (options.m < 2 || options.m > kHnswMaxM)
    throw std::invalid_argument("HnswOptions.m: must be in 2.." + to_string(kHnswMaxM) +
                                ", got " + to_string(options.m));
  if (options.ef_construction < 1)
    throw std::invalid_argument("HnswOptions.ef_construction: must be >= 1, got " +
                                to_string(options.ef_construction));
  if (options.ef_search < 1)
    throw std::invalid_argument("HnswOptions.ef_search: must be >= 1, got " +
                                to_string(options.ef_search));
}

namespace detail {

template <class T>
T* HugePageAllocator<T>::allocate(std::size_t n) {
  constexpr std::size_t kHuge = std::size_t{2} << 20;
  const std::size_t bytes = n * sizeof(T);
  if (bytes < kHuge) {
    if (void* p = std::malloc(std::max<std::size_t>(bytes, 1))) return static_cast<T*>(p);
    throw std::bad_alloc();
  }
  // Whole huge pages, so the kernel can back all of it with them.
  void* p = std::aligned_alloc(kHuge, (bytes + kHuge - 1) / kHuge * kHuge);
  if (!p) throw std::bad_alloc();
#ifdef MADV_HUGEPAGE
  madvise(p, bytes, MADV_HUGEPAGE);
#endif
  return static_cast<T*>(p);
}
template struct HugePageAllocator<float>;
template struct HugePageAllocator<std::uint32_t>;

}  // namespace detail

HnswIndex::HnswIndex(int dim, HnswOptions options)
    : VectorIndex(dim), options_(options), rng_(options.seed) {
  validate(options);
  level_scale_ = 1.0 / std::log(options.m);
}

void HnswIndex::clear() { *this = HnswIndex(dim(), options_); }

void HnswIndex::for_each(const EntryVisitor& f) const {
  for (const auto& [id, slot] : slot_of_) f(id, key(slot));
}

std::uint32_t* HnswIndex::links(std::uint32_t slot, int level) {
  return level == 0 ? &links0_[std::size_t{slot} * (1 + 2 * options_.m)]
                    : &upper_[upper_at_[slot] + std::size_t(level - 1) * (1 + options_.m)];
}

const std::uint32_t* HnswIndex::links(std::uint32_t slot, int level) const {
  return const_cast<HnswIndex*>(this)->links(slot, level);
}

void HnswIndex::add_key(std::uint64_t id, const float* key) {
  const DotFn dot = dot_kernels().dot;
  remove(id);
  std::uint32_t slot;
  if (free_.empty()) {
    slot = new_slot();
  } else {
    slot = free_.back();
    free_.pop_back();
  }
  std::copy_n(key, dim(), &keys_[std::size_t{slot} * dim()]);
  ids_[slot] = id;
  connect(dot, slot);
  live_[slot] = 1;
  slot_of_.emplace(id, slot);
}

// A fresh slot with a random level: P(level >= l) = m^-l.
std::uint32_t HnswIndex::new_slot() {
  const auto slot = static_cast<std::uint32_t>(ids_.size());
  const double u = std::uniform_real_distribution<double>(0.0, 1.0)(rng_);
  const int level = std::min(static_cast<int>(-std::log(1.0 - u) * level_scale_), 255);
  keys_.resize(keys_.size() + dim());
  ids_.push_back(0);
  live_.push_back(0);
  level_.push_back(static_cast<std::uint8_t>(level));
  links0_.resize(links0_.size() + 1 + 2 * options_.m, 0);
  upper_at_.push_back(static_cast<std::uint32_t>(upper_.size()));
  upper_.resize(upper_.size() + std::size_t(level) * (1 + options_.m), 0);
  return slot;
}

// Inserts `slot` (key written, not live) into the graph on levels
// 0..level_[slot]. A reused slot keeps its level; its old lists are only
// overwritten level by level after the search, because when it is the entry
// point they are the search's only way into the graph.
void HnswIndex::connect(DotFn dot, std::uint32_t slot) {
  const int level = level_[slot];
  if (entry_ == kNone) {
    entry_ = slot;
    top_level_ = level;
    return;
  }
  const float* q = key(slot);
  std::uint32_t entry = greedy_descent(dot, q, entry_, top_level_, level);
  for (int l = std::min(level, top_level_); l >= 0; --l) {
    std::vector<Scored> found = search_level(dot, q, entry, l, options_.ef_construction);
    if (found.empty()) continue;  // nothing live reachable on this level
    std::sort(found.begin(), found.end(), std::greater<>());
    entry = found.front().second;
    select_neighbors(dot, found, options_.m);
    std::uint32_t* own = links(slot, l);
    own[0] = static_cast<std::uint32_t>(found.size());
    for (std::size_t i = 0; i < found.size(); ++i) own[1 + i] = found[i].second;
    for (const auto& [sim, n] : found) add_link(dot, n, slot, l);
  }
  if (level > top_level_) {
    entry_ = slot;
    top_level_ = level;
  }
}

// hnswlib's getNeighborsByHeuristic2. `candidates` is sorted best first,
// similarities to the base node. A candidate is kept only if it is closer to
// the base than to every neighbour kept so far, which spreads the links over
// different directions instead of one tight cluster (what keeps clustered
// data navigable).
void HnswIndex::select_neighbors(DotFn dot, std::vector<Scored>& candidates,
                                 int max_count) const {
  if (static_cast<int>(candidates.size()) <= max_count) return;
  std::size_t kept = 0;
  for (std::size_t i = 0; i < candidates.size() && kept < std::size_t(max_count); ++i) {
    const auto [sim, c] = candidates[i];
    bool good = true;
    for (std::size_t j = 0; j < kept && good; ++j)
      good = dot(key(c), key(candidates[j].second), dim()) <= sim;
    if (good) candidates[kept++] = candidates[i];
  }
  candidates.resize(kept);
}

// Adds the edge from -> to, re-selecting from's list by the heuristic when full.
void HnswIndex::add_link(DotFn dot, std::uint32_t from, std::uint32_t to, int level) {
  std::uint32_t* list = links(from, level);
  const std::uint32_t count = list[0];
  if (std::find(list + 1, list + 1 + count, to) != list + 1 + count) return;
  if (static_cast<int>(count) < capacity(level)) {
    list[1 + count] = to;
    list[0] = count + 1;
    return;
  }
  std::vector<Scored> candidates;
  candidates.reserve(count + 1);
  candidates.emplace_back(dot(key(from), key(to), dim()), to);
  for (std::uint32_t i = 0; i < count; ++i)
    candidates.emplace_back(dot(key(from), key(list[1 + i]), dim()), list[1 + i]);
  std::sort(candidates.begin(), candidates.end(), std::greater<>());
  select_neighbors(dot, candidates, capacity(level));
  list[0] = static_cast<std::uint32_t>(candidates.size());
  for (std::size_t i = 0; i < candidates.size(); ++i) list[1 + i] = candidates[i].second;
}

void HnswIndex::remove(std::uint64_t id) {
  const auto it = slot_of_.find(id);
  if (it == slot_of_.end()) return;
  const std::uint32_t slot = it->second;
  slot_of_.erase(it);
  live_[slot] = 0;
  const DotFn dot = dot_kernels().dot;
  unlink(dot, slot);
  free_.push_back(slot);
}

// Every live neighbour that links back to `slot` drops that link and
// re-selects its list from its own and `slot`'s other live neighbours, so
// the paths that went through `slot` survive its removal. `slot`'s own lists
// stay as they are: stale links into it from elsewhere still lead on.
void HnswIndex::unlink(DotFn dot, std::uint32_t slot) {
  std::vector<std::uint32_t> ids;
  std::vector<Scored> candidates;
  for (int l = 0; l <= level_[slot]; ++l) {
    const std::uint32_t* gone = links(slot, l);
    for (std::uint32_t i = 0; i < gone[0]; ++i) {
      const std::uint32_t n = gone[1 + i];
      std::uint32_t* list = links(n, l);
      if (!live_[n] || std::find(list + 1, list + 1 + list[0], slot) == list + 1 + list[0])
        continue;
      ids.assign(list + 1, list + 1 + list[0]);
      ids.insert(ids.end(), gone + 1, gone + 1 + gone[0]);
      std::sort(ids.begin(), ids.end());
      ids.erase(std::unique(ids.begin(), ids.end()), ids.end());
      candidates.clear();
      for (const std::uint32_t c : ids)
        if (c != n && live_[c]) candidates.emplace_back(dot(key(n), key(c), dim()), c);
      std::sort(candidates.begin(), candidates.end(), std::greater<>());
      select_neighbors(dot, candidates, capacity(l));
      list[0] = static_cast<std::uint32_t>(candidates.size());
      for (std::size_t j = 0; j < candidates.size(); ++j) list[1 + j] = candidates[j].second;
    }
  }
}

// Walks levels from_level .. to_level+1 moving to the best neighbour while
// that improves; returns the entry point for to_level.
std::uint32_t HnswIndex::greedy_descent(DotFn dot, const float* query, std::uint32_t entry,
                                        int from_level, int to_level) const {
  float best = dot(query, key(entry), dim());
  for (int l = from_level; l > to_level; --l) {
    for (bool moved = true; moved;) {
      moved = false;
      const std::uint32_t* list = links(entry, l);
      for (std::uint32_t i = 0; i < list[0]; ++i) {
        const float sim = dot(query, key(list[1 + i]), dim());
        if (sim > best) {
          best = sim;
          entry = list[1 + i];
          moved = true;
        }
      }
    }
  }
  return entry;
}

// Beam search on one level (hnswlib's searchBaseLayer): returns up to ef live
// slots, unordered. Removed slots are expanded but never returned.
std::vector<HnswIndex::Scored> HnswIndex::search_level(DotFn dot, const float* query,
                                                      std::uint32_t entry, int level,
                                                      int ef) const {
  Scratch& s = scratch;
  s.begin(ids_.size());
  auto& frontier = s.candidates;  // max-heap: best unexpanded first
  std::vector<Scored> found;      // min-heap: worst kept first
  found.reserve(ef + 1);
  frontier.clear();

  const float entry_sim = dot(query, key(entry), dim());
  s.visit(entry);
  frontier.emplace_back(entry_sim, entry);
  if (live_[entry]) found.emplace_back(entry_sim, entry);
  float worst = found.empty() ? -std::numeric_limits<float>::infinity() : entry_sim;

  while (!frontier.empty()) {
    const auto [sim, c] = frontier.front();
    if (sim < worst && static_cast<int>(found.size()) == ef) break;
    std::pop_heap(frontier.begin(), frontier.end());
    frontier.pop_back();

    // Gather the unvisited neighbours and prefetch all their keys before the
    // first dot: the loads then overlap instead of stalling one by one.
    const std::uint32_t* list = links(c, level);
    std::uint32_t fresh[2 * kHnswMaxM];
    int count = 0;
    for (std::uint32_t i = 0; i < list[0]; ++i)
      if (s.visit(list[1 + i])) fresh[count++] = list[1 + i];
    for (int i = 0; i < count; ++i)
      for (int b = 0; b < dim() * int(sizeof(float)); b += 64)
        prefetch(reinterpret_cast<const char*>(key(fresh[i])) + b);
    for (int i = 0; i < count; ++i) {
      const std::uint32_t n = fresh[i];
      const float n_sim = dot(query, key(n), dim());
      if (static_cast<int>(found.size()) == ef && n_sim <= worst) continue;
      // n will probably be expanded: fetch its list now, off the critical path.
      prefetch(links(n, level));
      frontier.emplace_back(n_sim, n);
      std::push_heap(frontier.begin(), frontier.end());
      if (!live_[n]) continue;
      found.emplace_back(n_sim, n);
      std::push_heap(found.begin(), found.end(), std::greater<>());
      if (static_cast<int>(found.size()) > ef) {
        std::pop_heap(found.begin(), found.end(), std::greater<>());
        found.pop_back();
      }
      worst = found.front().first;
    }
  }
  return found;
}

std::vector<Candidate> HnswIndex::search_key(const float* query, int k,
                                             float min_similarity) const {
  if (slot_of_.empty() || k <= 0) return {};
  const DotFn dot = dot_kernels().dot;
  const std::uint32_t entry = greedy_descent(dot, query, entry_, top_level_, 0);
  // Recall at a fixed beam width falls as the graph grows (bench_lookup's
  // clustered keys, m 16, ef 16: recall@1 0.99 at 1e5 entries, 0.97 at 3e5,
  // 0.87 at 1e6), so the beam widens with sqrt(size / 1e5): ef 12 -> 38 at
  // 1e6 measured 0.98 -> 0.96 at 17 -> 59 us.
  const double widen = std::sqrt(static_cast<double>(size()) / 1e5);
  const int ef = std::max({k, options_.ef_search, static_cast<int>(options_.ef_search * widen)});
  std::vector<Scored> found = search_level(dot, query, entry, 0, ef);
  std::sort(found.begin(), found.end(), std::greater<>());
  std::vector<Candidate> out;
  for (const auto& [sim, slot] : found) {
    if (sim < min_similarity || static_cast<int>(out.size()) == k) break;
    out.push_back({ids_[slot], sim});
  }
  return out;
}

}  // namespace attention_echo::index
