// Nearest-neighbour search over unit-norm semantic keys (cosine similarity =
// dot product). One index per key space (namespace, head shape, layer); the
// cache owns it and calls it under its own lock, so it need not be
// thread-safe for writers, but search() is const and must be safe to call
// concurrently with other search() calls.
#pragma once

#include <cstdint>
#include <memory>
#include <span>
#include <vector>

namespace attention_echo::index {

struct Candidate {
  std::uint64_t id = 0;
  float similarity = 0.0f;
};

class SemanticIndex {
 public:
  explicit SemanticIndex(int dim);
  ~SemanticIndex();
  SemanticIndex(SemanticIndex&&) noexcept;
  SemanticIndex& operator=(SemanticIndex&&) noexcept;

  int dim() const;
  std::size_t size() const;
  // key: dim floats, unit norm. An id already present is replaced.
  void add(std::uint64_t id, std::span<const float> key);
  void remove(std::uint64_t id);  // unknown id: no-op
  void clear();
  // Up to k candidates with similarity >= min_similarity, best first.
  std::vector<Candidate> search(std::span<const float> key, int k, float min_similarity) const;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace attention_echo::index
