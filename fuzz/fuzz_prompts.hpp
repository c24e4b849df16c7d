// Prompts for the serving store targets (fuzz_kv_block_store, fuzz_kv_l2):
// a prefix of an earlier prompt (so prompts share blocks, and a shared
// prefix may end mid-block) and up to `max_own` tokens of its own from a
// small alphabet (so runs repeat), never empty.
#pragma once

#include <fuzzer/FuzzedDataProvider.h>

#include <vector>

namespace attention_echo::fuzzing {

inline std::vector<int> next_prompt(FuzzedDataProvider& in, const std::vector<std::vector<int>>& earlier,
                                    int max_own, int alphabet) {
  std::vector<int> tokens;
  if (!earlier.empty() && in.ConsumeBool()) {
    const auto& base = earlier[in.ConsumeIntegralInRange<std::size_t>(0, earlier.size() - 1)];
    tokens.assign(base.begin(), base.begin() + in.ConsumeIntegralInRange<std::size_t>(0, base.size()));
  }
  const int own = in.ConsumeIntegralInRange(tokens.empty() ? 1 : 0, max_own);
  for (int n = 0; n < own; ++n) tokens.push_back(in.ConsumeIntegralInRange(0, alphabet - 1));
  return tokens;
}

}  // namespace attention_echo::fuzzing
