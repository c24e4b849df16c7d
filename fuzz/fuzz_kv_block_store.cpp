// The planner's K/V store (serving/kv_block_store.hpp) under a sequence of
// inserts (exact and approximate, some continuing a stored prefix's blocks
// as the planner does), prefix lookups, donor searches and clears in three
// namespaces, under a byte budget of a few blocks. Every K row written is a
// function of the tokens up to it (and of whether the forward was exact),
// so whatever the store keeps, shares, replaces or evicts, a row it hands
// back must be the row an exact forward of the asked-for tokens wrote, or
// an approximate one where the lookup says so. Also: no prefix longer than
// one stored in that namespace, a prompt just stored is found whole, donors
// are exact prompts of the namespace, a cleared namespace holds nothing, and
// the bytes stay within the budget.
#include <fuzzer/FuzzedDataProvider.h>

#include <algorithm>
#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include "serving/kv_block_store.hpp"
#include "fuzz_prompts.hpp"
#include "fuzz_require.hpp"

namespace {

namespace serving = attention_echo::serving;
namespace llama = attention_echo::llama;

constexpr int kBlock = 64;

using attention_echo::fuzzing::require;

// Row t's K as an exact forward of tokens[0..t] writes it here: exactly
// representable, never 0 (a zeroed page), approximate rows half off.
float row_value(const std::vector<int>& tokens, int t, bool approximate) {
  std::uint32_t h = 2166136261u;
  for (int i = 0; i <= t; ++i) h = (h ^ static_cast<std::uint32_t>(tokens[i])) * 16777619u;
  return static_cast<float>(h % (1u << 20) + 1) + (approximate ? 0.5f : 0.0f);
}

int common_prefix(const std::vector<int>& a, const std::vector<int>& b) {
  const std::size_t n = std::min(a.size(), b.size());
  return static_cast<int>(std::mismatch(a.begin(), a.begin() + n, b.begin()).first - a.begin());
}

struct Reference {
  // Per namespace, every prompt stored (exact ones flagged), evicted or not:
  // a bound on what a lookup may find, not a copy of the store.
  std::map<std::string, std::vector<std::pair<std::vector<int>, bool>>> stored;
  int longest(const std::string& ns, const std::vector<int>& tokens, bool exact_only) const {
    int best = 0;
    if (auto it = stored.find(ns); it != stored.end())
      for (const auto& [prompt, exact] : it->second)
        if (exact || !exact_only) best = std::max(best, common_prefix(prompt, tokens));
    return best;
  }
};

// The rows [0, rows) of blocks, against the tokens they claim to be.
void check_rows(const std::vector<serving::Block>& blocks, int rows, const std::vector<int>& tokens,
                bool approximate_allowed) {
  require(rows <= static_cast<int>(blocks.size()) * kBlock);
  for (int t = 0; t < rows; ++t) {
    const float k = blocks[t / kBlock]->data[t % kBlock];  // layer 0's K plane, kv_dim 1
    const float v = blocks[t / kBlock]->data[kBlock + t % kBlock];
    require(v == -k);
    require(k == row_value(tokens, t, false) || (approximate_allowed && k == row_value(tokens, t, true)));
  }
}

void check_lookup(serving::KVBlockStore& store, const Reference& ref, const std::string& ns,
                  const std::vector<int>& tokens, bool exact_only) {
  const serving::KVBlockStore::Prefix p = store.longest_prefix(ns, tokens, exact_only);
  require(p.length >= 0 && p.length <= ref.longest(ns, tokens, exact_only));
  require(!exact_only || !p.approximate);
  check_rows(p.blocks, p.length, tokens, p.approximate);
}

// Prompts of up to 200 tokens of their own, over 4 token ids.
std::vector<int> next_prompt(FuzzedDataProvider& in, const std::vector<std::vector<int>>& earlier) {
  return attention_echo::fuzzing::next_prompt(in, earlier, 200, 4);
}

void insert(serving::KVBlockStore& store, Reference& ref, const std::string& ns, const std::vector<int>& tokens,
            bool approximate, bool continue_stored) {
  const int T = static_cast<int>(tokens.size());
  llama::KVState kv = store.state({}, 0);
  int from = 0;
  if (continue_stored) {  // as a plan does: the stored prefix's blocks, shared
    const serving::KVBlockStore::Prefix p = store.longest_prefix(ns, tokens, !approximate);
    from = std::min(p.length, T - 1);
    kv = store.state(p.blocks, from);
  }
  kv.make_writable(from, T, 1, 1);
  for (int t = from; t < T; ++t) {
    *kv.writable_k(0, t) = row_value(tokens, t, approximate);
    *kv.writable_v(0, t) = -row_value(tokens, t, approximate);
  }
  kv.length = T;
  const std::size_t records = store.size();
  if (!store.insert(ns, tokens, kv, approximate, approximate ? 0.01 : 0.0)) {
    require(store.size() == records);  // alone over the budget: nothing stored, nothing evicted
    return;
  }
  ref.stored[ns].emplace_back(tokens, !approximate);
  // Just stored: found whole, exact where it was exact.
  const serving::KVBlockStore::Prefix p = store.longest_prefix(ns, tokens);
  require(p.length == T);
  check_rows(p.blocks, p.length, tokens, p.approximate);
  if (!approximate) require(store.longest_prefix(ns, tokens, true).length == T);
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  FuzzedDataProvider in(data, size);
  const std::size_t block_bytes = 2 * kBlock * sizeof(float) + kBlock * sizeof(int);
  const std::size_t budget = in.ConsumeIntegralInRange<std::size_t>(1, 12) * block_bytes;
  serving::KVBlockStore store({.layers = 1, .kv_dim = 1, .block_tokens = kBlock}, budget);
  Reference ref;
  std::vector<std::vector<int>> prompts;
  const std::string spaces[] = {"", "tenant-a", "tenant-b"};
  for (int op = 0; op < 48 && in.remaining_bytes() > 0; ++op) {
    const std::string& ns = spaces[in.ConsumeIntegralInRange(0, 2)];
    switch (in.ConsumeIntegralInRange(0, 5)) {
      case 0:
      case 1: {
        prompts.push_back(next_prompt(in, prompts));
        insert(store, ref, ns, prompts.back(), in.ConsumeBool(), in.ConsumeBool());
        break;
      }
      case 2: {
        const std::vector<int> tokens = next_prompt(in, prompts);
        check_lookup(store, ref, ns, tokens, in.ConsumeBool());
        break;
      }
      case 3: {
        const std::vector<int> tokens = next_prompt(in, prompts);
        for (const serving::KVBlockStore::Similar& s : store.similar(ns, tokens, in.ConsumeIntegralInRange(1, 4))) {
          require(s.record->name_space == ns && !s.record->approximate);
          require(ref.longest(ns, s.record->tokens, true) == static_cast<int>(s.record->tokens.size()));
          check_rows(s.record->blocks, static_cast<int>(s.record->tokens.size()), s.record->tokens, false);
        }
        break;
      }
      case 4: {
        store.clear(ns);
        ref.stored.erase(ns);
        for (const std::vector<int>& p : prompts) require(store.longest_prefix(ns, p).length == 0);
        break;
      }
      default: {
        if (!prompts.empty()) check_lookup(store, ref, ns, prompts[in.ConsumeIntegralInRange<std::size_t>(0, prompts.size() - 1)], false);
        break;
      }
    }
    require(store.bytes() <= budget);
  }
  return 0;
}
