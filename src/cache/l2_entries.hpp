// The cache's entries in the shared L2 store (attention_echo/l2_store.hpp):
// written through after a miss computes them, read back on an L1 miss.
//
// An entry is stored under its identity: its prefix tokens when it has
// them, else its semantic key (the same bytes on every machine), so another
// process asking with the same tokens, or the same embeddings, finds it;
// similarity search stays in L1, over what the process computed or fetched.
// Key (README "Shared store (Redis)"):
//   ae:<format>:cache:<config fingerprint>:<namespace>:<H>.<Hkv>.<D>:<mask>:<layer>:<t|s><hash>
// Value: u32 format, u64 FNV-1a of the body, body = the key again, then the
// entry in its snapshot form (entry_codec.hpp). A value whose checksum, key,
// shapes, tokens, k fingerprint or semantic key disagree with the call is
// rejected (L2Stats::rejected) and the call goes on as an L1 miss.
#pragma once

#include <memory>
#include <optional>
#include <string>

#include "attention_echo/l2_store.hpp"
#include "cache/entry.hpp"
#include "cache/tier.hpp"

namespace attention_echo::cache {

class L2Entries {
 public:
  // The config names what the payloads depend on (hash_dim, mode,
  // block_size, sparse_mass): caches configured otherwise never share keys.
  L2Entries(std::shared_ptr<L2Store> store, const EchoConfig& config, const TierSet& tiers);

  // Whether a call looking for a `match` tier's entry looks in L2: by
  // tokens when it has them, else by semantic key (call.key computed).
  static bool covers(const Call& call, Match match);
  // The entry stored under the call's identity, checked against the call.
  std::optional<Entry> fetch(const Call& call) const;

  // Encoded outside the cache's lock, put once the entry is in L1.
  L2Write encode(const Entry& entry) const;
  void put(const L2Write& write) const { store_->put({&write, 1}); }

  L2Stats stats() const { return store_->stats(); }

 private:
  std::string key_of(const KeySpace& space, std::span<const std::int32_t> tokens, std::span<const float> key) const;
  std::optional<Entry> decode(const std::string& bytes, const std::string& key, const Call& call) const;

  std::shared_ptr<L2Store> store_;
  const TierSet& tiers_;
  int hash_dim_;
  std::string prefix_;  // "ae:<format>:cache:<config fingerprint>:"
};

}  // namespace attention_echo::cache
