// The semantic key of a prefix: L2-normalise(R^T * mean_pool(embeddings)),
// R an E x hash_dim random projection. R's entries come from a counter-based
// generator (splitmix64) through an Irwin-Hall sum of 12 uniforms, so R — and
// the key — are the same bytes on every run, compiler and machine: no libm
// call, integer sums only, and this file builds with -ffp-contract=off.
#pragma once

#include <map>
#include <memory>
#include <mutex>
#include <vector>

#include "attention_echo/tensor.hpp"

namespace attention_echo::index {

class SemanticKeyer {
 public:
  explicit SemanticKeyer(int hash_dim) : hash_dim_(hash_dim) {}

  int hash_dim() const { return hash_dim_; }
  // embeddings must already be validated (finite, non-empty).
  std::vector<float> key(const MatrixView& embeddings) const;

 private:
  // R for embedding width e, [e, hash_dim] row-major; built once per width.
  const std::vector<double>& projection(int e) const;

  int hash_dim_;
  mutable std::mutex mutex_;
  mutable std::map<int, std::unique_ptr<const std::vector<double>>> projections_;
};

}  // namespace attention_echo::index
