// Token alignment of a request against a donor (a stored request whose K/V
// the KV-blend tier reuses). For every request position it names the donor
// position holding the same token in a run of matching tokens, or -1 where
// the token has to be computed. Handles substitutions, insertions and
// deletions (runs resume after the edit) and chunks that moved (runs are
// anchored by k-gram hashes at any donor position, the nearest to where the
// previous run would continue winning), so RAG passages in another order
// still align.
#pragma once

#include <cstdint>
#include <span>
#include <vector>

namespace attention_echo::serving {

struct TokenAlignment {
  std::vector<int> donor_position;  // per request token: donor index or -1
  int aligned = 0;                  // tokens with a donor position
  int moved = 0;                    // aligned tokens whose position differs (K is re-rotated)
  int exact_prefix = 0;             // leading tokens aligned to the same position
};

// anchor: tokens a run must share before it is taken (shorter coincidences
// are not worth reusing: their context differs). Throws std::invalid_argument
// for anchor < 1.
TokenAlignment align_tokens(std::span<const int> request, std::span<const int> donor, int anchor = 8);

}  // namespace attention_echo::serving
