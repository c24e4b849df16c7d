// The interface every nearest-neighbour index implements (hnswlib's
// AlgorithmInterface): unit-norm keys of a fixed dim, similarity = dot
// product. FlatIndex is exact, HnswIndex approximate; SemanticIndex picks
// between them by size.
//
// Writers (add/remove/clear) need external exclusion; search() is const and
// safe to run concurrently with other searches.
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>
#include <span>
#include <vector>

namespace attention_echo::index {

struct Candidate {
  std::uint64_t id = 0;
  float similarity = 0.0f;
};

using EntryVisitor = std::function<void(std::uint64_t id, const float* key)>;

class VectorIndex {
 public:
  explicit VectorIndex(int dim);  // dim > 0
  virtual ~VectorIndex() = default;

  int dim() const { return dim_; }
  virtual std::size_t size() const = 0;
  // key: dim floats, unit norm. An id already present is replaced.
  void add(std::uint64_t id, std::span<const float> key) {
    check(key);
    add_key(id, key.data());
  }
  virtual void remove(std::uint64_t id) = 0;  // unknown id: no-op
  virtual void clear() = 0;
  // Up to k candidates with similarity >= min_similarity, best first.
  std::vector<Candidate> search(std::span<const float> key, int k, float min_similarity) const {
    check(key);
    return search_key(key.data(), k, min_similarity);
  }
  // f(id, key) for every entry, in no particular order.
  virtual void for_each(const EntryVisitor& f) const = 0;

 protected:
  VectorIndex(const VectorIndex&) = default;
  VectorIndex& operator=(const VectorIndex&) = default;

  // The key-size check is done: key and query hold dim() floats.
  virtual void add_key(std::uint64_t id, const float* key) = 0;
  virtual std::vector<Candidate> search_key(const float* query, int k,
                                            float min_similarity) const = 0;

 private:
  void check(std::span<const float> key) const;  // std::invalid_argument unless dim() floats

  int dim_;
};

}  // namespace attention_echo::index
