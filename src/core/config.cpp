#include "attention_echo/config.hpp"

#include <cmath>
#include <string>

#include "attention_echo/l2_store.hpp"
#include "core/errors.hpp"

namespace attention_echo {

std::string_view to_string(EvictionPolicy policy) {
  return policy == EvictionPolicy::kLru ? "lru" : "lfu";
}

std::string_view to_string(EchoMode mode) {
  switch (mode) {
    case EchoMode::kOff: return "off";
    case EchoMode::kSparse: return "sparse";
    case EchoMode::kDense: return "dense";
  }
  return "?";
}

EvictionPolicy parse_eviction_policy(std::string_view text) {
  if (text == "lru") return EvictionPolicy::kLru;
  if (text == "lfu") return EvictionPolicy::kLfu;
  throw_invalid_field("eviction_policy", "must be 'lru' or 'lfu', got '" + std::string(text) + "'");
}

EchoMode parse_echo_mode(std::string_view text) {
  if (text == "off" || text == "exact") return EchoMode::kOff;  // "exact": the older name
  if (text == "sparse") return EchoMode::kSparse;
  if (text == "dense") return EchoMode::kDense;
  throw_invalid_field("mode", "must be 'off', 'sparse' or 'dense', got '" + std::string(text) + "'");
}

// Messages of the seed's fields are the seed's texts, word for word.
void EchoConfig::validate() const {
  if (capacity <= 0) throw_invalid_field("capacity", "must be positive");
  if (!(similarity_threshold >= 0.0 && similarity_threshold <= 1.0))
    throw_invalid_field("similarity_threshold", "must be between 0 and 1");
  if (max_prefix_length <= 0) throw_invalid_field("max_prefix_length", "must be positive");
  if (!(adjustment_strength >= 0.0 && adjustment_strength <= 1.0))
    throw_invalid_field("adjustment_strength", "must be between 0 and 1");
  if (hash_dim <= 0) throw_invalid_field("hash_dim", "must be positive");
  if (max_bytes <= 0) throw_invalid_field("max_bytes", "must be positive");
  if (device_max_bytes <= 0) throw_invalid_field("device_max_bytes", "must be positive");
  if (std::isnan(max_error) || max_error < 0.0)
    throw_invalid_field("max_error", "must be non-negative (inf disables the guard)");
  if (verify_rows < 1) throw_invalid_field("verify_rows", "must be at least 1");
  if (!(length_tolerance >= 0.0 && length_tolerance <= 1.0))
    throw_invalid_field("length_tolerance", "must be between 0 and 1");
  if (threads < 0) throw_invalid_field("threads", "must be non-negative (0 = all hardware threads)");
  if (!(sparse_mass > 0.0 && sparse_mass <= 1.0)) throw_invalid_field("sparse_mass", "must be in (0, 1]");
  if (block_size != 32 && block_size != 64 && block_size != 128)
    throw_invalid_field("block_size", "must be 32, 64 or 128");
  if (!store_url.empty()) parse_l2_url(store_url, "store_url");
}

}  // namespace attention_echo
