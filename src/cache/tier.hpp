// A reuse tier as a component (docs/architecture.md, "Tiers"). The cache
// does not switch on tiers: it walks the enabled ones, best first, and asks
// each to
//   capture  - on a miss, take what it needs to serve later (its payload);
//   serve    - on a hit, write the prefix rows of out from a stored payload;
// and snapshots ask each to write, read and validate its own payload. The
// verification guard (guard.hpp) checks what approximate tiers serve.
//
// A new tier is one file implementing ReuseTier, a line in TierSet's
// constructor (tier.cpp), and its name in the public Tier enum and
// CacheStats::counter.
#pragma once

#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "attention_echo/cache.hpp"
#include "cache/entry.hpp"
#include "core/binary_reader.hpp"
#include "core/binary_writer.hpp"
#include "kernels/backend.hpp"

namespace attention_echo::cache {

// One attention_with_echo call: the request as the tiers see it, and the
// result the cache fills in.
struct Call {
  kernels::AnyAttentionProblem problem;
  int prefix = 0;                        // cached prefix rows: min(prefix_length, max_prefix_length)
  KeySpace space;
  MatrixView embeddings;                 // the semantic key's source
  std::span<const std::int32_t> tokens;  // empty: the call cannot match by tokens
  std::uint64_t k_fingerprint = 0;       // of k's prefix rows; set with tokens
  std::vector<float> key;                // semantic key; empty until a similar-key tier looks
  EchoResult result;
  double flops_saved = 0.0;
};

// How a call finds an entry a tier can serve.
enum class Match {
  kTokens,      // the same prefix tokens and k fingerprint
  kSimilarKey,  // a semantic key within similarity_threshold, prefix length within length_tolerance
};

// When a tier takes its payload on a miss.
enum class Capture {
  kInKernel,    // while the exact kernel computes every row: capture() runs that kernel
  kFromOutput,  // from the exact output rows, once they are computed
};

// What serving a hit wrote and what it cost.
struct Served {
  int rows = 0;                // prefix rows [0, rows) of out hold the tier's result
  double cost_share = 0.0;     // attention FLOPs spent on them / computing them exactly
  double kept_fraction = 1.0;  // EchoResult::kept_fraction
};

class ReuseTier {
 public:
  virtual ~ReuseTier() = default;

  virtual Tier kind() const = 0;
  virtual Match match() const = 0;
  virtual Capture capture_stage() const = 0;
  // Hits of an approximate tier pass the verification guard before they are
  // served; the others are exact by construction.
  virtual bool approximate() const = 0;

  // On a miss. kInKernel: computes every row of call.problem.out exactly and
  // captures on the way; kFromOutput: reads the already computed out.
  virtual std::unique_ptr<const TierPayload> capture(const Call& call, const kernels::Backend& backend) const = 0;
  // On a hit: writes prefix rows [0, Served::rows) of call.problem.out from
  // payload (this tier's, covering stored_prefix rows).
  virtual Served serve(const Call& call, const TierPayload& payload, int stored_prefix,
                       const kernels::Backend& backend) const = 0;

  // Snapshot form of the payload; read() parses what write() wrote and
  // throws std::runtime_error (through in.fail) on a short section.
  virtual void write(const TierPayload& payload, BinaryWriter& out) const = 0;
  virtual std::unique_ptr<const TierPayload> read(BinaryReader& in) const = 0;
  // The first way a read payload disagrees with its entry's shape, or ""
  // when it agrees: a loaded payload is later handed to the kernels unchecked.
  virtual std::string validate(const TierPayload& payload, const KeySpace& space, int prefix) const = 0;
};

std::unique_ptr<const ReuseTier> make_exact_tier();
std::unique_ptr<const ReuseTier> make_sparse_tier(const EchoConfig& config);
std::unique_ptr<const ReuseTier> make_dense_tier(const EchoConfig& config);

// The tiers of one cache: every tier (a snapshot may hold payloads of tiers
// the config does not use) and, best first, those the config enables; at most
// one enabled tier captures in the kernel, since a miss runs it once.
class TierSet {
 public:
  explicit TierSet(const EchoConfig& config);
  std::span<const ReuseTier* const> enabled() const { return enabled_; }
  const ReuseTier* find(Tier kind) const;  // null when no tier is of that kind

 private:
  std::vector<std::unique_ptr<const ReuseTier>> all_;
  std::vector<const ReuseTier*> enabled_;
};

}  // namespace attention_echo::cache
