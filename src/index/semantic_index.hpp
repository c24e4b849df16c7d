// Nearest-neighbour search over unit-norm semantic keys (cosine similarity =
// dot product): exact brute force (FlatIndex) up to a size threshold, an
// HNSW graph (HnswIndex) above it. One index per key space (namespace, head
// shape, layer); the cache owns it and calls it under its own lock, so it
// need not be thread-safe for writers, but search() is const and safe to
// call concurrently with other search() calls.
#pragma once

#include <memory>

#include "index/hnsw_index.hpp"
#include "index/index.hpp"

namespace attention_echo::index {

struct SemanticIndexOptions {
  // Exact search up to this many entries, HNSW above it; back to exact below
  // half of it (hysteresis, so an index sitting at the threshold does not
  // rebuild on every add/remove). SIZE_MAX: always exact; 0: always HNSW.
  // Measured (dim 128, AVX-512): brute force and HNSW tie at ~500 entries;
  // at 1000 brute force takes ~12 us, HNSW ~6 us. Up to here exactness wins.
  std::size_t hnsw_threshold = 1024;
  HnswOptions hnsw;  // the graph's parameters once above the threshold
};

class SemanticIndex final : public VectorIndex {
 public:
  // std::invalid_argument for dim <= 0 or hnsw options out of range.
  explicit SemanticIndex(int dim, SemanticIndexOptions options = {});

  std::size_t size() const override { return active_->size(); }
  void remove(std::uint64_t id) override;
  void clear() override;
  void for_each(const EntryVisitor& f) const override;

 private:
  void add_key(std::uint64_t id, const float* key) override;
  std::vector<Candidate> search_key(const float* query, int k,
                                    float min_similarity) const override;
  // Replaces the active index by `next` holding the same entries.
  void move_entries_to(std::unique_ptr<VectorIndex> next);

  SemanticIndexOptions options_;
  std::unique_ptr<VectorIndex> active_;  // a FlatIndex, or an HnswIndex when hnsw_
  bool hnsw_ = false;
};

}  // namespace attention_echo::index
