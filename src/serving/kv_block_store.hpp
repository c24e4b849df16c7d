// The K/V of served requests, kept the way serving engines keep it (vLLM's
// block hashes, SGLang's radix tree): fixed-size token blocks, each named by
// a hash chained over the namespace and every token up to its end, so equal
// prefixes share blocks and the longest stored prefix of a request is found
// by walking its own blocks: lookup cost depends on the request's length,
// not on how many requests are stored. A request whose stored prefix ends
// inside a block reuses that block's leading rows (token granularity, like
// a radix tree).
//
// A block is a page of the engine's K/V (llama::KVPage), the very object: a
// prompt's forward writes its K/V into pages, insert() keeps them as blocks
// without a copy, and state() hands stored blocks to the next prompt's
// llama::KVState, again without a copy (the engine copies a shared page
// only to write into it). So block_tokens is the engine's page size, a
// positive multiple of 64 (llama::KVState).
//
// Requests are also kept as records (tokens + block list) so the KV-blend
// tier can use a similar one as a donor. Eviction is LRU over records under a
// byte budget counted once per unique block.
//
// Blocks from a blended (approximate) forward carry the guard's error
// estimate. An exact block replaces an approximate one with the same chain
// hash; errors never compound because approximate records are not donors.
//
// Not thread-safe: one store per serving loop, or lock around it.
#pragma once

#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

#include "attention_echo/llama.hpp"
#include "serving/token_alignment.hpp"

namespace attention_echo::serving {

// The key of a request in the donor index: a feature-hashed profile of its
// token trigrams, unit norm, so the cosine of two profiles measures how many
// token runs the requests share, which is what blending can reuse. O(T), no
// model call.
inline constexpr int kProfileDim = 128;
std::vector<float> token_profile(std::span<const int> tokens, int dim = kProfileDim);

// A stored block: the K/V rows of every layer for block_tokens positions
// (llama::KVPage's layout), shared with the states that use it.
using Block = std::shared_ptr<const llama::KVPage>;

class KVBlockStore {
 public:
  struct Shape {
    int layers = 0;
    int kv_dim = 0;
    int block_tokens = llama::KVState::kDefaultPageTokens;
  };
  // Throws std::invalid_argument naming a non-positive field, or a
  // block_tokens that is not a multiple of 64.
  KVBlockStore(Shape shape, std::size_t max_bytes);
  ~KVBlockStore();
  KVBlockStore(KVBlockStore&&) noexcept;
  KVBlockStore& operator=(KVBlockStore&&) noexcept;

  const Shape& shape() const { return shape_; }
  // The first `rows` rows of a block list (a Prefix's or a Record's) as a
  // KVState that shares the blocks as its pages and takes new pages from
  // the store's page pool, so that the blocks it evicts are the pages the
  // next prompts write.
  llama::KVState state(std::span<const Block> blocks, int rows) const;
  // Writes `bytes` of pages into the page pool ahead of use (see
  // llama::KVPagePool). Throws std::invalid_argument beyond the budget.
  void reserve(std::size_t bytes);

  // Where a stored prefix's rows live: row t of the prefix is row
  // t % block_tokens of blocks[t / block_tokens].
  struct Prefix {
    int length = 0;
    bool approximate = false;
    double error = 0.0;  // max over the blocks used
    std::vector<Block> blocks;
  };
  // The chain hashes naming the full blocks of `tokens` in this namespace,
  // first block first: the same on every machine (the shared L2 store's keys).
  std::vector<std::uint64_t> block_hashes(std::string_view name_space, std::span<const int> tokens) const;

  // exact_only: stop before the first block an approximate forward stored.
  Prefix longest_prefix(std::string_view name_space, std::span<const int> tokens, bool exact_only = false);

  // Stores rows [0, tokens.size()) of a request from kv (pages of this
  // store's shape), keeping kv's own pages as the blocks it did not have:
  // from then on they are shared, so the engine copies one before writing
  // into it (the trailing partial one when the sequence goes on). Returns
  // false (storing nothing) when the request alone exceeds the byte budget.
  // Throws std::invalid_argument naming tokens or kv, storing nothing.
  bool insert(std::string_view name_space, std::span<const int> tokens, const llama::KVState& kv, bool approximate,
              double error);

  struct Record {
    std::uint64_t id = 0;
    std::string name_space;
    std::vector<int> tokens;
    std::vector<Block> blocks;  // rows as in Prefix
    bool approximate = false;
    TokenAnchors anchors;  // exact records: the donor index of align_tokens
  };
  // Up to `count` exact records of the namespace whose token profile (see
  // token_profile) has a cosine of at least min_similarity with the
  // request's, best first: the KV-blend tier's donor candidates.
  // Approximate records are never donors.
  struct Similar {
    const Record* record;
    float similarity;
  };
  std::vector<Similar> similar(std::string_view name_space, std::span<const int> tokens, int count,
                               float min_similarity = 0.0f) const;
  void touch(std::uint64_t id);

  std::size_t size() const;   // records
  std::size_t bytes() const;  // unique blocks and tokens
  std::uint64_t evictions() const { return evictions_; }
  void clear();
  // Drops that namespace's records and the blocks only they used; no block
  // is shared across namespaces (chains start at the namespace's root).
  void clear(std::string_view name_space);

 private:
  struct Node;
  struct Impl;
  Shape shape_;
  std::size_t max_bytes_;
  std::uint64_t evictions_ = 0;
  std::shared_ptr<llama::KVPagePool> pages_;
  std::unique_ptr<Impl> impl_;
};

}  // namespace attention_echo::serving
