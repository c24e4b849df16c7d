#include "index/flat_index.hpp"

#include <algorithm>
#include <functional>

#include "index/distance.hpp"

namespace attention_echo::index {

void FlatIndex::add_key(std::uint64_t id, const float* key) {
  const auto [it, inserted] = row_of_.emplace(id, ids_.size());
  if (inserted) {
    ids_.push_back(id);
    keys_.resize(keys_.size() + dim());
  }
  std::copy_n(key, dim(), &keys_[it->second * dim()]);
}

void FlatIndex::remove(std::uint64_t id) {
  const auto it = row_of_.find(id);
  if (it == row_of_.end()) return;
  const std::size_t r = it->second, last = ids_.size() - 1;
  row_of_.erase(it);
  if (r != last) {
    std::copy_n(row(last), dim(), &keys_[r * dim()]);
    ids_[r] = ids_[last];
    row_of_[ids_[r]] = r;
  }
  ids_.pop_back();
  keys_.resize(last * dim());
}

void FlatIndex::clear() {
  keys_.clear();
  ids_.clear();
  row_of_.clear();
}

void FlatIndex::for_each(const EntryVisitor& f) const {
  for (std::size_t r = 0; r < ids_.size(); ++r) f(ids_[r], row(r));
}

std::vector<Candidate> FlatIndex::search_key(const float* query, int k,
                                             float min_similarity) const {
  if (k <= 0) return {};
  const DotRowsFn dot_rows = dot_kernels().dot_rows;
  // Min-heap of the best k so far; its top is the bar a row must beat.
  std::vector<std::pair<float, std::size_t>> best;
  constexpr std::size_t kBlock = 256;
  float sims[kBlock];
  for (std::size_t begin = 0; begin < ids_.size(); begin += kBlock) {
    const std::size_t count = std::min(kBlock, ids_.size() - begin);
    dot_rows(query, row(begin), count, dim(), sims);
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
  for (const auto& [sim, r] : best) out.push_back({ids_[r], sim});
  return out;
}

}  // namespace attention_echo::index
