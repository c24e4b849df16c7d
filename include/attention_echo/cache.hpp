// AttentionEchoCache: attention with cross-request reuse of the prefix block.
//
// attention_with_echo computes out = attention(q, k, v) for every row. Rows
// i < prefix_length depend on the prefix alone; those are what a cache entry
// lets a later call reuse, best tier first (docs/architecture.md, "Tiers"):
//   exact  - same prefix_tokens (and k fingerprint): copy the cached rows;
//   sparse - similar semantic key: recompute only the cached kept tiles;
//   dense  - similar semantic key: cached logits + first-order Taylor step.
// Every sparse/dense hit is checked by the verification guard before it is
// served; a hit above max_error is recomputed exactly and replaces the entry.
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "attention_echo/config.hpp"
#include "attention_echo/l2_store.hpp"
#include "attention_echo/tensor.hpp"

namespace attention_echo {

enum class Tier { kNone, kExact, kSparse, kDense };
std::string_view to_string(Tier tier);

// Everything attention_with_echo takes besides q, k, v and out.
struct EchoRequest {
  int prefix_length = 0;
  MatrixView prefix_embeddings;              // required when prefix_length > 0
  int layer_id = 0;
  std::optional<float> scale;                // default 1/sqrt(D)
  bool causal = true;
  std::span<const std::int32_t> prefix_tokens;  // empty: no exact tier
  std::string_view name_space;               // entries never cross namespaces
  // CUDA views: the cudaStream_t the call's work is ordered on (null: the
  // legacy default stream). attention_with_echo returns once the work is
  // queued; out is ready when the stream gets there.
  void* stream = nullptr;
};

struct EchoResult {
  bool echo_hit = false;        // any tier served the prefix rows
  double similarity = 0.0;      // of the best candidate looked at (1 for exact)
  int layer_id = 0;
  int tokens_echoed = 0;        // prefix rows served from the cache
  int tokens_computed = 0;      // rows computed exactly
  Tier tier = Tier::kNone;
  double estimated_error = 0.0; // guard's measured relative L2 (0 exact/miss)
  bool rejected = false;        // a hit the guard refused
  double kept_fraction = 1.0;   // sparse hits: kept tiles / causal prefix tiles
  // "full" (miss or rejected), "echo" (sparse/dense), "exact".
  std::string_view compute_mode() const;
};

struct CacheStats {
  std::uint64_t lookups = 0;
  std::uint64_t hits_exact = 0;
  std::uint64_t hits_sparse = 0;
  std::uint64_t hits_dense = 0;
  std::uint64_t misses = 0;      // includes rejected hits
  std::uint64_t rejected = 0;
  std::uint64_t evictions = 0;
  std::uint64_t entries = 0;
  std::uint64_t bytes = 0;
  std::uint64_t tokens_echoed = 0;
  std::uint64_t tokens_computed = 0;
  double flops_saved = 0.0;      // attention FLOPs not spent (guard cost deducted)
  // Snapshot entries load() did not keep: larger than max_bytes on their own,
  // or evicted to fit capacity / max_bytes (a snapshot of a larger cache).
  std::uint64_t snapshot_dropped = 0;
  // Entries computed on a miss but not stored: larger than max_bytes on
  // their own (the call is served exactly; the cache never grows past its
  // budget for one entry).
  std::uint64_t oversize_skipped = 0;
  std::uint64_t hits() const { return hits_exact + hits_sparse + hits_dense; }
  // The counter a call served by `tier` adds one to: hits_exact, hits_sparse,
  // hits_dense, or misses for Tier::kNone (computed exactly). Reports and the
  // cache iterate over tiers with it instead of naming each field.
  static std::uint64_t CacheStats::*counter(Tier tier);
  double hit_rate() const { return lookups ? double(hits()) / double(lookups) : 0.0; }
};

class AttentionEchoCache {
 public:
  explicit AttentionEchoCache(EchoConfig config = {});
  // A cache whose shared L2 store is `store` (connect_redis's, or the
  // caller's own L2Store) instead of one config.store_url names. Throws
  // std::invalid_argument naming store_url when it is set too, or store
  // when it is null.
  AttentionEchoCache(EchoConfig config, std::shared_ptr<L2Store> store);
  ~AttentionEchoCache();
  AttentionEchoCache(const AttentionEchoCache&) = delete;
  AttentionEchoCache& operator=(const AttentionEchoCache&) = delete;

  // q: [H, T, D], k/v: [Hkv, T, D] (any strides, see tensor.hpp), out like q.
  // Throws std::invalid_argument naming the argument on bad input, before
  // touching the cache or out.
  EchoResult attention_with_echo(const HeadsView& q, const HeadsView& k, const HeadsView& v,
                                 const MutableHeadsView& out, const EchoRequest& request);
  // The same on views of any dtype: float32 in host memory, or (a build with
  // AE_CUDA) float16/bfloat16 in CUDA device memory, where the call runs on
  // request.stream and the entries it makes keep their payloads in that
  // device's memory (device_max_bytes). All four views share one device and
  // dtype; entries are never served across devices or dtypes. Dense mode is
  // host-only.
  EchoResult attention_with_echo(const AnyHeadsView& q, const AnyHeadsView& k, const AnyHeadsView& v,
                                 const MutableAnyHeadsView& out, const EchoRequest& request);

  // L2-normalised R * mean_pool(embeddings), R a fixed-seed projection: the
  // same bytes on every run and machine. Throws on bad embeddings.
  std::vector<float> compute_semantic_key(const MatrixView& embeddings) const;

  CacheStats stats() const;  // consistent snapshot
  std::size_t size() const;
  void clear();              // drops entries and zeroes stats
  const EchoConfig& config() const;
  // The shared L2 store's counters (config.store_url); zeros without one.
  L2Stats l2_stats() const;

  // ---- tenants: per-namespace stats and clear (README, "Reliability") ----
  // A namespace's counters (calls made with that EchoRequest::name_space,
  // evictions of its entries, its snapshot drops) and its entries and bytes.
  // stats() holds the sum over namespaces. A namespace never seen: zeros.
  CacheStats stats(std::string_view name_space) const;
  // Namespaces with entries or counters, sorted.
  std::vector<std::string> namespaces() const;
  // Drops that namespace's entries and counters; stats() loses exactly what
  // stats(name_space) held, other namespaces keep theirs.
  void clear(std::string_view name_space);

  // Snapshot: versioned, checksummed; save writes a temp file, fsyncs it and
  // renames it over path (a crash leaves the previous snapshot or the new one).
  // load replaces the cache's entries, or throws and leaves them as they were.
  // Entries the limits cannot hold are not loaded and are counted in
  // stats().snapshot_dropped. Both throw std::runtime_error naming the file
  // when it cannot be read, written or parsed.
  void save(const std::string& path) const;
  void load(const std::string& path);

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace attention_echo
