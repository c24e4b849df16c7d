#include "index/semantic_key.hpp"

#include <cmath>
#include <cstdint>

namespace attention_echo::index {
namespace {

constexpr std::uint64_t kProjectionSeed = 0x5eed'ec40'0001ULL;

std::uint64_t splitmix64(std::uint64_t x) {
  x += 0x9e3779b97f4a7c15ULL;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ULL;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebULL;
  return x ^ (x >> 31);
}

// Approximately N(0, 1): sum of 12 uniforms on (0, 1) minus 6 (Irwin-Hall).
// Three 64-bit draws give twelve 16-bit uniforms; the sum is an exact integer.
double gaussian(std::uint64_t counter) {
  std::uint64_t sum = 0;
  for (std::uint64_t draw = 0; draw < 3; ++draw) {
    std::uint64_t bits = splitmix64(kProjectionSeed ^ (counter * 3 + draw));
    for (int part = 0; part < 4; ++part, bits >>= 16) sum += bits & 0xffffu;
  }
  return (static_cast<double>(sum) + 6.0) / 65536.0 - 6.0;
}

}  // namespace

const std::vector<double>& SemanticKeyer::projection(int e) const {
  std::lock_guard lock(mutex_);
  auto& slot = projections_[e];
  if (!slot) {
    auto r = std::make_unique<std::vector<double>>(static_cast<std::size_t>(e) * hash_dim_);
    // The counter depends on (row, column) only, so R for width e is the
    // top rows of R for any wider width: keys of different widths still agree
    // on what they share.
    for (int i = 0; i < e; ++i)
      for (int j = 0; j < hash_dim_; ++j)
        (*r)[static_cast<std::size_t>(i) * hash_dim_ + j] =
            gaussian((static_cast<std::uint64_t>(i) << 24) + static_cast<std::uint64_t>(j));
    slot = std::move(r);
  }
  return *slot;
}

std::vector<float> SemanticKeyer::key(const MatrixView& embeddings) const {
  const int rows = embeddings.rows, cols = embeddings.cols;
  std::vector<double> mean(cols, 0.0);
  for (int r = 0; r < rows; ++r)
    for (int c = 0; c < cols; ++c) mean[c] += embeddings.data[static_cast<std::size_t>(r) * cols + c];
  for (double& m : mean) m /= rows;

  const std::vector<double>& proj = projection(cols);
  std::vector<double> projected(hash_dim_, 0.0);
  for (int c = 0; c < cols; ++c)
    for (int j = 0; j < hash_dim_; ++j) projected[j] += mean[c] * proj[static_cast<std::size_t>(c) * hash_dim_ + j];

  double norm2 = 0.0;
  for (double x : projected) norm2 += x * x;
  // An all-zero pooled vector has no direction: its key stays zero and
  // matches nothing.
  const double inv = norm2 > 0.0 ? 1.0 / std::sqrt(norm2) : 0.0;
  std::vector<float> key(hash_dim_);
  for (int j = 0; j < hash_dim_; ++j) key[j] = static_cast<float>(projected[j] * inv);
  return key;
}

}  // namespace attention_echo::index
