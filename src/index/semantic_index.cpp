// SemanticIndex: exact SIMD brute force over a contiguous key matrix up to a
// size threshold, an HNSW graph above it (see hnsw.hpp).
#include "index/semantic_index.hpp"

#include <immintrin.h>
#include <sys/mman.h>

#include <algorithm>
#include <cmath>
#include <functional>
#include <limits>
#include <mutex>
#include <stdexcept>
#include <string>

#include "core/isa.hpp"
#include "index/hnsw.hpp"

namespace attention_echo::index {
namespace detail {
namespace {

// ---------------------------------------------------------------- dot product

// Horizontal sum; plain SSE so both SIMD paths can inline it.
float hsum(__m128 x) {
  x = _mm_add_ps(x, _mm_movehl_ps(x, x));
  return _mm_cvtss_f32(_mm_add_ss(x, _mm_shuffle_ps(x, x, 1)));
}

__attribute__((target("avx512f"))) float dot_avx512(const float* a, const float* b, int n) {
  // Four accumulators hide the FMA latency; a masked load takes the tail.
  __m512 acc[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(),
                   _mm512_setzero_ps()};
  int i = 0;
  for (; i + 64 <= n; i += 64)
    for (int j = 0; j < 4; ++j)
      acc[j] = _mm512_fmadd_ps(_mm512_loadu_ps(a + i + 16 * j), _mm512_loadu_ps(b + i + 16 * j),
                               acc[j]);
  for (; i < n; i += 16) {
    const __mmask16 m = n - i >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << (n - i)) - 1);
    acc[0] = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, a + i), _mm512_maskz_loadu_ps(m, b + i),
                             acc[0]);
  }
  // Fold the four 128-bit lanes. The masked forms (here and below) only
  // because the unmasked ones, and _mm512_reduce_add_ps, trip GCC 12's
  // -Wuninitialized on _mm512_undefined_ps.
  __m512 sum = _mm512_add_ps(_mm512_add_ps(acc[0], acc[1]), _mm512_add_ps(acc[2], acc[3]));
  sum = _mm512_add_ps(sum, _mm512_maskz_shuffle_f32x4(0xFFFF, sum, sum, _MM_SHUFFLE(1, 0, 3, 2)));
  sum = _mm512_add_ps(sum, _mm512_maskz_shuffle_f32x4(0xFFFF, sum, sum, _MM_SHUFFLE(2, 3, 0, 1)));
  return hsum(_mm512_mask_extractf32x4_ps(_mm_setzero_ps(), 0xF, sum, 0));
}

__attribute__((target("avx2,fma"))) float dot_avx2(const float* a, const float* b, int n) {
  __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(),
                   _mm256_setzero_ps()};
  int i = 0;
  for (; i + 32 <= n; i += 32)
    for (int j = 0; j < 4; ++j)
      acc[j] = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 8 * j), _mm256_loadu_ps(b + i + 8 * j),
                               acc[j]);
  const __m256 sum8 = _mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3]));
  float sum = hsum(_mm_add_ps(_mm256_castps256_ps128(sum8), _mm256_extractf128_ps(sum8, 1)));
  for (; i < n; ++i) sum += a[i] * b[i];
  return sum;
}

float dot_scalar(const float* a, const float* b, int n) {
  float sum = 0.0f;
  for (int i = 0; i < n; ++i) sum += a[i] * b[i];
  return sum;
}

// The brute-force scan. Four rows at a time share each query load and one
// combined horizontal reduction, which dominates a 128-float dot: per-row
// dot() calls ran ~2.5x slower.
__attribute__((target("avx512f"))) void dot_rows_avx512(const float* q, const float* rows,
                                                        std::size_t count, int dim, float* out) {
  std::size_t r = 0;
  for (; r + 4 <= count; r += 4) {
    const float* row = rows + r * dim;
    __m512 acc[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(),
                     _mm512_setzero_ps()};
    for (int i = 0; i < dim; i += 16) {
      const __mmask16 m = dim - i >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << (dim - i)) - 1);
      const __m512 qi = _mm512_maskz_loadu_ps(m, q + i);
      for (int j = 0; j < 4; ++j)
        acc[j] = _mm512_fmadd_ps(qi, _mm512_maskz_loadu_ps(m, row + j * dim + i), acc[j]);
    }
    // Per 128-bit lane: interleave-add pairs, then the four rows into one
    // vector of [row0, row1, row2, row3] partial sums; fold the four lanes.
    const __m512 t0 = _mm512_add_ps(_mm512_maskz_unpacklo_ps(0xFFFF, acc[0], acc[1]),
                                    _mm512_maskz_unpackhi_ps(0xFFFF, acc[0], acc[1]));
    const __m512 t1 = _mm512_add_ps(_mm512_maskz_unpacklo_ps(0xFFFF, acc[2], acc[3]),
                                    _mm512_maskz_unpackhi_ps(0xFFFF, acc[2], acc[3]));
    __m512 sum = _mm512_add_ps(_mm512_shuffle_ps(t0, t1, _MM_SHUFFLE(1, 0, 1, 0)),
                               _mm512_shuffle_ps(t0, t1, _MM_SHUFFLE(3, 2, 3, 2)));
    sum = _mm512_add_ps(sum, _mm512_maskz_shuffle_f32x4(0xFFFF, sum, sum, _MM_SHUFFLE(1, 0, 3, 2)));
    sum = _mm512_add_ps(sum, _mm512_maskz_shuffle_f32x4(0xFFFF, sum, sum, _MM_SHUFFLE(2, 3, 0, 1)));
    _mm_storeu_ps(out + r, _mm512_mask_extractf32x4_ps(_mm_setzero_ps(), 0xF, sum, 0));
  }
  for (; r < count; ++r) out[r] = dot_avx512(q, rows + r * dim, dim);
}

__attribute__((target("avx2,fma"))) void dot_rows_avx2(const float* q, const float* rows,
                                                      std::size_t count, int dim, float* out) {
  for (std::size_t r = 0; r < count; ++r) out[r] = dot_avx2(q, rows + r * dim, dim);
}

void dot_rows_scalar(const float* q, const float* rows, std::size_t count, int dim, float* out) {
  for (std::size_t r = 0; r < count; ++r) out[r] = dot_scalar(q, rows + r * dim, dim);
}

struct Kernels {
  float (*dot)(const float*, const float*, int);
  void (*dot_rows)(const float*, const float*, std::size_t, int, float*);
};

// Per call, so AE_ISA and set_active_isa() reach the index like the kernels.
Kernels kernels() {
  switch (active_isa()) {
    case Isa::kAvx512: return {dot_avx512, dot_rows_avx512};
    case Isa::kAvx2: return {dot_avx2, dot_rows_avx2};
    case Isa::kScalar: break;
  }
  return {dot_scalar, dot_rows_scalar};
}

// ---------------------------------------------------------------- tuning hook

std::mutex tuning_mutex;
IndexTuning tuning;

// ---------------------------------------------------------------- search scratch

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

void prefetch(const void* p) { _mm_prefetch(static_cast<const char*>(p), _MM_HINT_T0); }

}  // namespace

float dot(const float* a, const float* b, int dim) { return kernels().dot(a, b, dim); }

IndexTuning index_tuning() {
  std::lock_guard lock(tuning_mutex);
  return tuning;
}

void set_index_tuning(const IndexTuning& t) {
  std::lock_guard lock(tuning_mutex);
  tuning = t;
}

// ---------------------------------------------------------------- HNSW

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

Hnsw::Hnsw(int dim, HnswParams params)
    : dim_(dim), p_(params), level_scale_(1.0 / std::log(params.m)), rng_(params.seed) {
  if (p_.m < 2 || p_.m > kMaxM || p_.ef_construction < 1 || p_.ef_search < 1)
    throw std::invalid_argument("HnswParams: need 2 <= m <= 64, ef_construction >= 1, ef_search >= 1");
}

std::uint32_t* Hnsw::links(std::uint32_t slot, int level) {
  return level == 0 ? &links0_[std::size_t{slot} * (1 + 2 * p_.m)]
                    : &upper_[upper_at_[slot] + std::size_t(level - 1) * (1 + p_.m)];
}

const std::uint32_t* Hnsw::links(std::uint32_t slot, int level) const {
  return const_cast<Hnsw*>(this)->links(slot, level);
}

void Hnsw::add(std::uint64_t id, const float* key) {
  remove(id);
  std::uint32_t slot;
  if (free_.empty()) {
    slot = new_slot();
  } else {
    slot = free_.back();
    free_.pop_back();
  }
  std::copy_n(key, dim_, &keys_[std::size_t{slot} * dim_]);
  ids_[slot] = id;
  connect(slot);
  live_[slot] = 1;
  slot_of_.emplace(id, slot);
}

// A fresh slot with a random level: P(level >= l) = m^-l.
std::uint32_t Hnsw::new_slot() {
  const auto slot = static_cast<std::uint32_t>(ids_.size());
  const double u = std::uniform_real_distribution<double>(0.0, 1.0)(rng_);
  const int level = std::min(static_cast<int>(-std::log(1.0 - u) * level_scale_), 255);
  keys_.resize(keys_.size() + dim_);
  ids_.push_back(0);
  live_.push_back(0);
  level_.push_back(static_cast<std::uint8_t>(level));
  links0_.resize(links0_.size() + 1 + 2 * p_.m, 0);
  upper_at_.push_back(static_cast<std::uint32_t>(upper_.size()));
  upper_.resize(upper_.size() + std::size_t(level) * (1 + p_.m), 0);
  return slot;
}

// Inserts `slot` (key written, not live) into the graph on levels
// 0..level_[slot]. A reused slot keeps its level; its old lists are only
// overwritten level by level after the search, because when it is the entry
// point they are the search's only way into the graph.
void Hnsw::connect(std::uint32_t slot) {
  const int level = level_[slot];
  if (entry_ == kNone) {
    entry_ = slot;
    top_level_ = level;
    return;
  }
  const float* q = key(slot);
  std::uint32_t entry = greedy_descent(q, entry_, top_level_, level);
  for (int l = std::min(level, top_level_); l >= 0; --l) {
    std::vector<Scored> found = search_level(q, entry, l, p_.ef_construction);
    if (found.empty()) continue;  // nothing live reachable on this level
    std::sort(found.begin(), found.end(), std::greater<>());
    entry = found.front().second;
    select_neighbors(found, p_.m);
    std::uint32_t* own = links(slot, l);
    own[0] = static_cast<std::uint32_t>(found.size());
    for (std::size_t i = 0; i < found.size(); ++i) own[1 + i] = found[i].second;
    for (const auto& [sim, n] : found) add_link(n, slot, l);
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
void Hnsw::select_neighbors(std::vector<Scored>& candidates, int max_count) const {
  if (static_cast<int>(candidates.size()) <= max_count) return;
  std::size_t kept = 0;
  for (std::size_t i = 0; i < candidates.size() && kept < std::size_t(max_count); ++i) {
    const auto [sim, c] = candidates[i];
    bool good = true;
    for (std::size_t j = 0; j < kept && good; ++j)
      good = dot(key(c), key(candidates[j].second), dim_) <= sim;
    if (good) candidates[kept++] = candidates[i];
  }
  candidates.resize(kept);
}

// Adds the edge from -> to, re-selecting from's list by the heuristic when full.
void Hnsw::add_link(std::uint32_t from, std::uint32_t to, int level) {
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
  candidates.emplace_back(dot(key(from), key(to), dim_), to);
  for (std::uint32_t i = 0; i < count; ++i)
    candidates.emplace_back(dot(key(from), key(list[1 + i]), dim_), list[1 + i]);
  std::sort(candidates.begin(), candidates.end(), std::greater<>());
  select_neighbors(candidates, capacity(level));
  list[0] = static_cast<std::uint32_t>(candidates.size());
  for (std::size_t i = 0; i < candidates.size(); ++i) list[1 + i] = candidates[i].second;
}

void Hnsw::remove(std::uint64_t id) {
  const auto it = slot_of_.find(id);
  if (it == slot_of_.end()) return;
  const std::uint32_t slot = it->second;
  slot_of_.erase(it);
  live_[slot] = 0;
  unlink(slot);
  free_.push_back(slot);
}

// Every live neighbour that links back to `slot` drops that link and
// re-selects its list from its own and `slot`'s other live neighbours, so
// the paths that went through `slot` survive its removal. `slot`'s own lists
// stay as they are: stale links into it from elsewhere still lead on.
void Hnsw::unlink(std::uint32_t slot) {
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
        if (c != n && live_[c]) candidates.emplace_back(dot(key(n), key(c), dim_), c);
      std::sort(candidates.begin(), candidates.end(), std::greater<>());
      select_neighbors(candidates, capacity(l));
      list[0] = static_cast<std::uint32_t>(candidates.size());
      for (std::size_t j = 0; j < candidates.size(); ++j) list[1 + j] = candidates[j].second;
    }
  }
}

// Walks levels from_level .. to_level+1 moving to the best neighbour while
// that improves; returns the entry point for to_level.
std::uint32_t Hnsw::greedy_descent(const float* query, std::uint32_t entry, int from_level,
                                   int to_level) const {
  float best = dot(query, key(entry), dim_);
  for (int l = from_level; l > to_level; --l) {
    for (bool moved = true; moved;) {
      moved = false;
      const std::uint32_t* list = links(entry, l);
      for (std::uint32_t i = 0; i < list[0]; ++i) {
        const float sim = dot(query, key(list[1 + i]), dim_);
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
std::vector<Hnsw::Scored> Hnsw::search_level(const float* query, std::uint32_t entry, int level,
                                             int ef) const {
  Scratch& s = scratch;
  s.begin(ids_.size());
  auto& frontier = s.candidates;  // max-heap: best unexpanded first
  std::vector<Scored> found;      // min-heap: worst kept first
  found.reserve(ef + 1);
  frontier.clear();

  const float entry_sim = dot(query, key(entry), dim_);
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
    std::uint32_t fresh[2 * kMaxM];
    int count = 0;
    for (std::uint32_t i = 0; i < list[0]; ++i)
      if (s.visit(list[1 + i])) fresh[count++] = list[1 + i];
    for (int i = 0; i < count; ++i)
      for (int b = 0; b < dim_ * int(sizeof(float)); b += 64)
        prefetch(reinterpret_cast<const char*>(key(fresh[i])) + b);
    for (int i = 0; i < count; ++i) {
      const std::uint32_t n = fresh[i];
      const float n_sim = dot(query, key(n), dim_);
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

std::vector<Candidate> Hnsw::search(const float* query, int k, float min_similarity) const {
  if (slot_of_.empty() || k <= 0) return {};
  const std::uint32_t entry = greedy_descent(query, entry_, top_level_, 0);
  // Recall at a fixed beam width falls as the graph grows (bench_lookup's
  // clustered keys, m 16, ef 16: recall@1 0.99 at 1e5 entries, 0.97 at 3e5,
  // 0.87 at 1e6), so the beam widens with sqrt(size / 1e5): ef 12 -> 38 at
  // 1e6 measured 0.98 -> 0.96 at 17 -> 59 us.
  const double widen = std::sqrt(static_cast<double>(size()) / 1e5);
  const int ef = std::max({k, p_.ef_search, static_cast<int>(p_.ef_search * widen)});
  std::vector<Scored> found = search_level(query, entry, 0, ef);
  std::sort(found.begin(), found.end(), std::greater<>());
  std::vector<Candidate> out;
  for (const auto& [sim, slot] : found) {
    if (sim < min_similarity || static_cast<int>(out.size()) == k) break;
    out.push_back({ids_[slot], sim});
  }
  return out;
}

}  // namespace detail

// ---------------------------------------------------------------- brute force

namespace {

// Exact search over a contiguous row-major key matrix; removal moves the
// last row into the hole so the matrix stays dense.
class FlatIndex {
 public:
  explicit FlatIndex(int dim) : dim_(dim) {}

  std::size_t size() const { return ids_.size(); }
  const float* key(std::size_t row) const { return &keys_[row * dim_]; }
  std::uint64_t id(std::size_t row) const { return ids_[row]; }

  void add(std::uint64_t id, const float* key) {
    const auto [it, inserted] = row_of_.emplace(id, ids_.size());
    if (inserted) {
      ids_.push_back(id);
      keys_.resize(keys_.size() + dim_);
    }
    std::copy_n(key, dim_, &keys_[it->second * dim_]);
  }

  void remove(std::uint64_t id) {
    const auto it = row_of_.find(id);
    if (it == row_of_.end()) return;
    const std::size_t row = it->second, last = ids_.size() - 1;
    row_of_.erase(it);
    if (row != last) {
      std::copy_n(&keys_[last * dim_], dim_, &keys_[row * dim_]);
      ids_[row] = ids_[last];
      row_of_[ids_[row]] = row;
    }
    ids_.pop_back();
    keys_.resize(last * dim_);
  }

  std::vector<Candidate> search(const float* query, int k, float min_similarity) const {
    if (k <= 0) return {};
    // Min-heap of the best k so far; its top is the bar a row must beat.
    std::vector<std::pair<float, std::size_t>> best;
    constexpr std::size_t kBlock = 256;
    float sims[kBlock];
    for (std::size_t begin = 0; begin < ids_.size(); begin += kBlock) {
      const std::size_t count = std::min(kBlock, ids_.size() - begin);
      detail::kernels().dot_rows(query, key(begin), count, dim_, sims);
      for (std::size_t i = 0; i < count; ++i) {
        const float sim = sims[i];
        if (sim < min_similarity) continue;
        if (static_cast<int>(best.size()) == k) {
          if (sim <= best.front().first) continue;
          std::pop_heap(best.begin(), best.end(), std::greater<>());
          best.pop_back();
        }
        best.emplace_back(sim, begin + i);
        std::push_heap(best.begin(), best.end(), std::greater<>());
      }
    }
    std::sort_heap(best.begin(), best.end(), std::greater<>());  // best first
    std::vector<Candidate> out;
    out.reserve(best.size());
    for (const auto& [sim, row] : best) out.push_back({ids_[row], sim});
    return out;
  }

 private:
  int dim_;
  std::vector<float> keys_;
  std::vector<std::uint64_t> ids_;
  std::unordered_map<std::uint64_t, std::size_t> row_of_;
};

}  // namespace

// ---------------------------------------------------------------- SemanticIndex

struct SemanticIndex::Impl {
  explicit Impl(int d) : dim(d) {}

  int dim;
  detail::IndexTuning tuning = detail::index_tuning();
  FlatIndex flat{dim};
  std::unique_ptr<detail::Hnsw> graph;  // set: HNSW mode, flat is empty

  void check(std::span<const float> key) const {
    if (static_cast<int>(key.size()) != dim)
      throw std::invalid_argument("key: expected " + std::to_string(dim) + " floats, got " +
                                  std::to_string(key.size()));
  }
};

SemanticIndex::SemanticIndex(int dim) {
  if (dim <= 0) throw std::invalid_argument("dim: must be positive");
  impl_ = std::make_unique<Impl>(dim);
}
SemanticIndex::~SemanticIndex() = default;
SemanticIndex::SemanticIndex(SemanticIndex&&) noexcept = default;
SemanticIndex& SemanticIndex::operator=(SemanticIndex&&) noexcept = default;

int SemanticIndex::dim() const { return impl_->dim; }

std::size_t SemanticIndex::size() const {
  return impl_->graph ? impl_->graph->size() : impl_->flat.size();
}

void SemanticIndex::add(std::uint64_t id, std::span<const float> key) {
  Impl& im = *impl_;
  im.check(key);
  if (im.graph) {
    im.graph->add(id, key.data());
    return;
  }
  im.flat.add(id, key.data());
  if (im.flat.size() > im.tuning.hnsw_threshold) {
    im.graph = std::make_unique<detail::Hnsw>(im.dim, im.tuning.hnsw);
    for (std::size_t row = 0; row < im.flat.size(); ++row)
      im.graph->add(im.flat.id(row), im.flat.key(row));
    im.flat = FlatIndex(im.dim);
  }
}

void SemanticIndex::remove(std::uint64_t id) {
  Impl& im = *impl_;
  if (!im.graph) {
    im.flat.remove(id);
    return;
  }
  im.graph->remove(id);
  if (im.graph->size() < im.tuning.hnsw_threshold / 2) {
    im.graph->for_each([&](std::uint64_t i, const float* k) { im.flat.add(i, k); });
    im.graph.reset();
  }
}

void SemanticIndex::clear() {
  impl_->flat = FlatIndex(impl_->dim);
  impl_->graph.reset();
}

std::vector<Candidate> SemanticIndex::search(std::span<const float> key, int k,
                                             float min_similarity) const {
  impl_->check(key);
  return impl_->graph ? impl_->graph->search(key.data(), k, min_similarity)
                      : impl_->flat.search(key.data(), k, min_similarity);
}

}  // namespace attention_echo::index
