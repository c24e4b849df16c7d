#include "index/index.hpp"

#include <stdexcept>
#include <string>

namespace attention_echo::index {

VectorIndex::VectorIndex(int dim) : dim_(dim) {
  if (dim <= 0) throw std::invalid_argument("dim: must be positive");
}

void VectorIndex::check(std::span<const float> key) const {
  if (static_cast<int>(key.size()) != dim_)
    throw std::invalid_argument("key: expected " + std::to_string(dim_) + " floats, got " +
                                std::to_string(key.size()));
}

}  // namespace attention_echo::index
