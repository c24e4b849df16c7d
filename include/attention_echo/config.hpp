// EchoConfig: every knob of the cache, with the seed package's names and
// defaults first and ours after. validate() throws std::invalid_argument whose
// message starts with the offending field's name.
//
// Exception policy of the whole library (Python sees ValueError and
// RuntimeError):
//   - std::invalid_argument for a bad argument, its message starting with the
//     argument's name ("capacity must be positive", "key: ..."); thrown before
//     any state changes.
//   - std::runtime_error for a bad or unreadable file, or failed IO, its
//     message naming the file; the object is left as it was.
//   - Nothing else escapes a public function (std::bad_alloc aside).
#pragma once

#include <cstddef>
#include <string>
#include <string_view>

namespace attention_echo {

enum class EvictionPolicy { kLru, kLfu };

// Which approximate tier a miss prepares and a similar-prefix hit serves.
// The exact tier (identical prefix_tokens) is always on; kOff turns the
// approximate tiers off entirely.
enum class EchoMode { kOff, kSparse, kDense };

std::string_view to_string(EvictionPolicy policy);
std::string_view to_string(EchoMode mode);
// Parse "lru"/"lfu" and "off"/"sparse"/"dense" ("exact", the older name of
// "off", is accepted too); throw std::invalid_argument naming the field.
EvictionPolicy parse_eviction_policy(std::string_view text);
EchoMode parse_echo_mode(std::string_view text);

struct EchoConfig {
  // --- the seed's fields (AttentionEcho 0.1.0) ---
  long long capacity = 1000;          // max entries
  double similarity_threshold = 0.85; // cosine similarity needed for an echo hit
  long long max_prefix_length = 2048; // longer prefixes cache their first rows only
  double adjustment_strength = 0.1;   // alpha of the dense tier's Taylor step
  bool enable_jacobian = true;        // dense tier: apply the Taylor step at all
  long long hash_dim = 128;           // semantic key dimension
  EvictionPolicy eviction_policy = EvictionPolicy::kLru;
  bool per_layer = false;             // layer id is part of the key space

  // --- ours ---
  long long max_bytes = 1LL << 30;    // hard limit on stored host bytes (keys, tokens, host payloads)
  long long device_max_bytes = 1LL << 30;  // the same per CUDA device, for the payloads kept there
  EchoMode mode = EchoMode::kSparse;
  double max_error = 0.05;            // guard: relative L2 error; inf = off
  long long verify_rows = 8;          // guard: exact rows checked per head
  double length_tolerance = 0.1;      // |p - p_c| <= tol * p_c for an echo hit
  long long threads = 0;              // 0 = all hardware threads
  double sparse_mass = 0.98;          // sparse tier: attention mass the kept tiles cover
  // Sparse tier tile edge: 32, 64 or 128 (64 or 128 with CUDA tensors, where
  // 128 keeps the miss's tile-mass capture at +6-15% of cuDNN's miss on an
  // H200 and 64 costs +21-32%: BENCHMARKS.md section 6).
  long long block_size = 64;
  // Shared L2 store beside the in-process entries: "" for none, else
  // "redis://HOST:PORT[?deadline_ms=3&...]" (l2_store.hpp: parse_l2_url).
  // Misses are written through; an L1 miss looks there within the deadline.
  std::string store_url;

  void validate() const;
};

}  // namespace attention_echo
