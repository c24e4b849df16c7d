// The planner's K/V blocks in the shared L2 store (attention_echo/l2_store.hpp):
// exact blocks a forward computed are written through; a prompt whose
// stored prefix ends early reads the following blocks from L2, 8 per round
// trip, as many as arrive within the lookup deadline. Blended (approximate) K/V never leaves
// the process.
//
// A block is named by the chain hash the KVBlockStore gives it (namespace
// and every token up to its end), so every process names the same prefix
// the same. Key (README "Shared store (Redis)"):
//   ae:<format>:kv:<model fingerprint>:<namespace>:<layers>.<kv_dim>.<block_tokens>:<chain hash>
// Value: u32 format, u64 FNV-1a of the body, body = the key again, the
// shape, the block's tokens and its K/V rows of every layer (llama::KVPage::data).
// A value whose checksum, key, shape or tokens disagree is rejected
// (L2Stats::rejected) and ends the run of blocks read.
#pragma once

#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "attention_echo/l2_store.hpp"
#include "attention_echo/llama.hpp"
#include "serving/kv_block_store.hpp"

namespace attention_echo::serving {

class KVBlocksL2 {
 public:
  KVBlocksL2(std::shared_ptr<L2Store> store, std::uint64_t model_fingerprint, KVBlockStore::Shape shape);

  // Full blocks first, first + 1, ... of `tokens` (hashes: their chain
  // hashes, KVBlockStore::block_hashes) as long as L2 holds them, checked.
  std::vector<Block> fetch(std::string_view name_space, std::span<const int> tokens,
                           std::span<const std::uint64_t> hashes, int first) const;
  // Writes full blocks first, first + 1, ... of kv (a prompt's exact K/V,
  // pages of block_tokens) through.
  void put(std::string_view name_space, std::span<const int> tokens, std::span<const std::uint64_t> hashes,
           int first, const llama::KVState& kv) const;

  L2Stats stats() const { return store_->stats(); }

 private:
  std::string key_of(std::string_view name_space, std::uint64_t hash) const;
  Block decode(const std::string& bytes, const std::string& key, std::span<const int> tokens) const;

  std::shared_ptr<L2Store> store_;
  KVBlockStore::Shape shape_;
  std::string prefix_;  // "ae:<format>:kv:<model fingerprint>:"
};

}  // namespace attention_echo::serving
