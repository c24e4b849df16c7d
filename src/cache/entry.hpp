// What a cache entry holds (DESIGN.md section 7). Payloads are immutable and
// shared: a call that found an entry keeps its payload alive even if another
// thread evicts the entry meanwhile.
#pragma once

#include <compare>
#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "kernels/attention_kernel.hpp"
#include "kernels/dense_echo.hpp"

namespace attention_echo::cache {

// Entries are never served across key spaces.
struct KeySpace {
  std::string name_space;
  int layer = -1;  // -1 unless per_layer
  int heads = 0;
  int kv_heads = 0;
  int dim = 0;
  bool causal = true;
  auto operator<=>(const KeySpace&) const = default;
};

struct Payload {
  int prefix = 0;                           // prefix rows the payload covers
  std::vector<float> exact_rows;            // [H, prefix, D]; only with prefix_tokens
  std::optional<kernels::TileSet> tiles;    // sparse tier
  std::optional<kernels::DenseLogits> dense;  // dense tier

  std::size_t bytes() const {
    std::size_t b = exact_rows.size() * sizeof(float);
    if (tiles) b += tiles->offsets.size() * sizeof(std::uint32_t) + tiles->cols.size() * sizeof(std::uint16_t);
    if (dense) b += dense->bytes();
    return b;
  }
};

struct Entry {
  std::uint64_t id = 0;
  KeySpace space;
  std::vector<float> key;             // empty: not in the semantic index
  std::vector<std::int32_t> tokens;   // empty: not in the exact index
  std::uint64_t k_fingerprint = 0;
  std::shared_ptr<const Payload> payload;
  std::uint64_t last_used = 0;
  std::uint64_t uses = 0;

  std::size_t bytes() const {
    return key.size() * sizeof(float) + tokens.size() * sizeof(std::int32_t) + payload->bytes();
  }
};

}  // namespace attention_echo::cache
