// Serving: how a prompt reuses earlier work. Two ways exist: take the K/V of
// a stored prompt that shares its first tokens and compute only the rest
// (exact prefix reuse, what vLLM and SGLang do), or run every layer through
// AttentionEchoCache, which serves the shared context's attention from a
// similar earlier request. A Router plans which one each prompt takes from a
// measured cost model and executes the plan on an Engine.
#pragma once

#include <cstddef>
#include <memory>
#include <span>
#include <string>

#include "attention_echo/cache.hpp"
#include "attention_echo/llama.hpp"

namespace attention_echo::serving {

// Exact prefix reuse: K/V of earlier prompts keyed by their tokens. A new
// prompt reuses the longest leading run of tokens any stored prompt shares;
// least recently used prompts leave first once max_bytes is reached.
class PrefixStore {
 public:
  explicit PrefixStore(std::size_t max_bytes = std::size_t{1} << 30);
  ~PrefixStore();
  PrefixStore(PrefixStore&&) noexcept;
  PrefixStore& operator=(PrefixStore&&) noexcept;

  struct Match {
    const llama::KVState* kv = nullptr;
    int length = 0;      // shared leading tokens
    bool exact = true;   // false: the K/V came from an approximate (echoed) forward
  };
  // match.kv stays valid until the next insert.
  Match longest_match(std::span<const int> tokens);
  // Stores the first kv.length tokens' K/V (nothing when that alone exceeds
  // max_bytes). Throws std::invalid_argument when kv is longer than tokens.
  void insert(std::span<const int> tokens, llama::KVState kv, bool exact = true);
  std::size_t size() const;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

// How one prompt is served.
struct Plan {
  enum class Route {
    kReuse,  // K/V of the first kv.length tokens from the store, the rest exactly
    kCache,  // every row through the layers, the shared context via the echo cache
  };
  Route route = Route::kReuse;
  int prefix_length = 0;     // the shared context the application declared
  llama::KVState kv;         // kReuse: the reused K/V; after execute: the prompt's
  bool reused_exact = true;  // kReuse: false when the reused K/V came from an echoed forward
};

// Plans and executes prompts over one prefix store. Without a cache every
// plan reuses the longest stored prefix. With one, a prompt whose stored
// prefix covers its shared context reuses it; otherwise the cost model
// prices finishing the stored prefix against routing through the cache.
// Every executed prompt's K/V is stored, echoed ones too: a later prompt with
// the same prefix then skips it, carrying the echo's measured error instead
// of paying for the prefix again. Not thread-safe: one Router per Engine.
class Router {
 public:
  // cache (may be null) must outlive the router; name_space keys its entries.
  explicit Router(AttentionEchoCache* cache, std::string name_space = "",
                  std::size_t store_bytes = std::size_t{512} << 20);
  ~Router();
  Router(Router&&) noexcept;

  // The route for `tokens` whose first prefix_length tokens are the shared
  // context. At least the last token is always computed (its logits).
  // Throws std::invalid_argument unless 0 <= prefix_length < tokens.size().
  Plan plan(std::span<const int> tokens, int prefix_length);
  // Runs the prompt as planned (keeping the logits of the last keep_rows
  // rows, all when negative), leaves its K/V in plan.kv and stores it.
  llama::ForwardResult execute(llama::Engine& engine, std::span<const int> tokens, Plan& plan, int keep_rows = 1);
  // Teaches the cost model what a forward over `rows` rows without reuse
  // cost, in CPU seconds: in total and in attention.
  void observe(int rows, double total_cpu_s, double attention_cpu_s);

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace attention_echo::serving
