// Exact search (hnswlib's BruteforceSearch): every query scans a contiguous
// row-major key matrix with the SIMD row kernel. Removal moves the last row
// into the hole so the matrix stays dense.
#pragma once

#include <unordered_map>

#include "index/index.hpp"

namespace attention_echo::index {

class FlatIndex final : public VectorIndex {
 public:
  explicit FlatIndex(int dim) : VectorIndex(dim) {}

  std::size_t size() const override { return ids_.size(); }
  void remove(std::uint64_t id) override;
  void clear() override;
  void for_each(const EntryVisitor& f) const override;

 private:
  void add_key(std::uint64_t id, const float* key) override;
  std::vector<Candidate> search_key(const float* query, int k,
                                    float min_similarity) const override;
  const float* row(std::size_t r) const { return &keys_[r * dim()]; }

  std::vector<float> keys_;         // row r: dim() floats
  std::vector<std::uint64_t> ids_;  // row -> id
  std::unordered_map<std::uint64_t, std::size_t> row_of_;
};

}  // namespace attention_echo::index
