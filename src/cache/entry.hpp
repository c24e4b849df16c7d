// What a cache entry holds (docs/architecture.md, "Cache"): how calls find it
// (key space, semantic key, prefix tokens and k fingerprint) and one payload
// per tier that captured on the miss that made it. Payloads are immutable and
// shared: a call that found an entry keeps its payload alive even if another
// thread evicts the entry meanwhile.
#pragma once

#include <compare>
#include <cstdint>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "attention_echo/cache.hpp"
#include "kernels/backend.hpp"

namespace attention_echo::cache {

// Entries are never served across key spaces; a payload is in the memory of
// its space's device, in its dtype.
struct KeySpace {
  std::string name_space;
  int layer = -1;  // -1 unless per_layer
  int heads = 0;
  int kv_heads = 0;
  int dim = 0;
  bool causal = true;
  Device device;
  DType dtype = DType::kF32;
  auto operator<=>(const KeySpace&) const = default;
};

// What one tier stores in an entry; only the tier that made it reads it
// (ReuseTier in tier.hpp).
struct TierPayload {
  virtual ~TierPayload() = default;
  // On the entry's device: counted against max_bytes on the host,
  // device_max_bytes on a CUDA device.
  virtual std::size_t bytes() const = 0;
};

struct Payload {
  int prefix = 0;  // prefix rows the payloads cover
  // Done when the miss's writes to the parts are (null on the host): a hit
  // waits for it, since the miss that made them may have run on another stream.
  std::shared_ptr<const kernels::Fence> written;
  std::vector<std::pair<Tier, std::unique_ptr<const TierPayload>>> parts;  // at most one per tier

  const TierPayload* find(Tier tier) const {
    for (const auto& [kind, part] : parts)
      if (kind == tier) return part.get();
    return nullptr;
  }
  std::size_t bytes() const {
    std::size_t b = 0;
    for (const auto& part : parts) b += part.second->bytes();
    return b;
  }
};

struct Entry {
  std::uint64_t id = 0;
  KeySpace space;
  std::vector<float> key;             // empty: not in the semantic index
  std::vector<std::int32_t> tokens;   // empty: not in the exact index
  std::uint64_t k_fingerprint = 0;    // of k's prefix rows; checked with tokens
  std::shared_ptr<const Payload> payload;
  std::uint64_t last_used = 0;
  std::uint64_t uses = 0;

  bool on_host() const { return space.device == Device::cpu(); }
  // Counted against max_bytes: the key and tokens, and a host payload.
  std::size_t host_bytes() const {
    return key.size() * sizeof(float) + tokens.size() * sizeof(std::int32_t) + (on_host() ? payload->bytes() : 0);
  }
  // Counted against device_max_bytes of space.device: a device payload.
  std::size_t device_bytes() const { return on_host() ? 0 : payload->bytes(); }
  std::size_t bytes() const { return host_bytes() + device_bytes(); }
};

}  // namespace attention_echo::cache
