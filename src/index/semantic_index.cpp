#include "index/semantic_index.hpp"

#include "index/flat_index.hpp"

namespace attention_echo::index {

SemanticIndex::SemanticIndex(int dim, SemanticIndexOptions options)
    : VectorIndex(dim), options_(options), active_(std::make_unique<FlatIndex>(dim)) {
  validate(options.hnsw);
}

void SemanticIndex::add_key(std::uint64_t id, const float* key) {
  active_->add(id, {key, static_cast<std::size_t>(dim())});
  if (!hnsw_ && active_->size() > options_.hnsw_threshold) {
    move_entries_to(std::make_unique<HnswIndex>(dim(), options_.hnsw));
    hnsw_ = true;
  }
}

void SemanticIndex::remove(std::uint64_t id) {
  active_->remove(id);
  if (hnsw_ && active_->size() < options_.hnsw_threshold / 2) {
    move_entries_to(std::make_unique<FlatIndex>(dim()));
    hnsw_ = false;
  }
}

void SemanticIndex::clear() {
  active_ = std::make_unique<FlatIndex>(dim());
  hnsw_ = false;
}

void SemanticIndex::for_each(const EntryVisitor& f) const {
  active_->for_each(f);
}

std::vector<Candidate> SemanticIndex::search_key(const float* query, int k,
                                                 float min_similarity) const {
  return active_->search({query, static_cast<std::size_t>(dim())}, k, min_similarity);
}

void SemanticIndex::move_entries_to(std::unique_ptr<VectorIndex> next) {
  active_->for_each([&](std::uint64_t id, const float* key) {
    next->add(id, {key, static_cast<std::size_t>(dim())});
  });
  active_ = std::move(next);
}

}  // namespace attention_echo::index
