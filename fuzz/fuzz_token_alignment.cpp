// The KV-blend tier's token alignment (serving/token_alignment.hpp): a
// request and up to three donors built from it by the input (chunks of the
// request copied in another order, with edits, and tokens of their own, over
// a small alphabet so that runs and coincidences are common). Whatever the
// input, every aligned token must be the donor's token at the position
// named (else the blend would reuse another token's K/V), the counts must
// be the positions', a request aligned with itself must align every token
// in place, and the merge must keep exactly the tokens some donor's run of
// min_run or more covers, each from the covering run that began earliest.
#include <fuzzer/FuzzedDataProvider.h>

#include <cstdint>
#include <vector>

#include "serving/token_alignment.hpp"
#include "fuzz_require.hpp"

namespace {

using attention_echo::serving::TokenAlignment;

using attention_echo::fuzzing::require;

void check_counts(const TokenAlignment& a, std::size_t T) {
  require(a.donor_position.size() == T && a.donor.size() == T);
  int aligned = 0, moved = 0, exact = 0;
  for (std::size_t i = 0; i < T; ++i) {
    aligned += a.donor_position[i] >= 0;
    moved += a.donor_position[i] >= 0 && a.donor_position[i] != static_cast<int>(i);
  }
  while (exact < static_cast<int>(T) && a.donor_position[exact] == exact) ++exact;
  require(a.aligned == aligned && a.moved == moved && a.exact_prefix == exact);
}

// Every aligned token is its donor's token there.
void check_tokens(const TokenAlignment& a, const std::vector<int>& request,
                  const std::vector<std::vector<int>>& donors) {
  for (std::size_t i = 0; i < request.size(); ++i) {
    const int j = a.donor_position[i];
    if (j < 0) continue;
    require(a.donor[i] >= 0 && a.donor[i] < static_cast<int>(donors.size()));
    const std::vector<int>& donor = donors[a.donor[i]];
    require(j < static_cast<int>(donor.size()) && donor[j] == request[i]);
  }
}

// The start of the run (consecutive donor positions) through token i, or -1.
int run_start(const TokenAlignment& a, int i) {
  if (a.donor_position[i] < 0) return -1;
  while (i > 0 && a.donor_position[i - 1] >= 0 && a.donor_position[i] == a.donor_position[i - 1] + 1) --i;
  return i;
}
int run_end(const TokenAlignment& a, int i) {
  const int T = static_cast<int>(a.donor_position.size());
  while (i + 1 < T && a.donor_position[i + 1] >= 0 && a.donor_position[i + 1] == a.donor_position[i] + 1) ++i;
  return i + 1;
}

// The merge keeps a token iff some donor's run of min_run or more covers
// it, from the one that began earliest (the earlier donor on a tie).
void check_merge(const TokenAlignment& merged, const std::vector<TokenAlignment>& per_donor, int min_run) {
  const int T = static_cast<int>(merged.donor_position.size());
  for (int i = 0; i < T; ++i) {
    int best = -1, best_start = 0;
    for (int d = 0; d < static_cast<int>(per_donor.size()); ++d) {
      const int start = run_start(per_donor[d], i);
      if (start < 0 || run_end(per_donor[d], i) - start < min_run) continue;
      if (best < 0 || start < best_start) best = d, best_start = start;
    }
    if (best < 0) {
      require(merged.donor_position[i] == -1);
    } else {
      require(merged.donor[i] == best && merged.donor_position[i] == per_donor[best].donor_position[i]);
    }
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  namespace serving = attention_echo::serving;
  FuzzedDataProvider in(data, size);
  const int alphabet = in.ConsumeIntegralInRange(2, 12);
  const int anchor = in.ConsumeIntegralInRange(1, 12);
  const int min_run = in.ConsumeIntegralInRange(1, 80);
  const int donors_wanted = in.ConsumeIntegralInRange(1, 3);
  std::vector<int> request(in.ConsumeIntegralInRange(0, 600));
  for (int& t : request) t = in.ConsumeIntegralInRange(0, alphabet - 1);

  std::vector<std::vector<int>> donors(donors_wanted);
  for (std::vector<int>& donor : donors) {
    for (int op = in.ConsumeIntegralInRange(0, 12); op > 0 && donor.size() < 1200; --op) {
      if (!request.empty() && in.ConsumeBool()) {  // a chunk of the request, maybe edited
        const std::size_t from = in.ConsumeIntegralInRange<std::size_t>(0, request.size() - 1);
        const std::size_t length = in.ConsumeIntegralInRange<std::size_t>(1, request.size() - from);
        const std::size_t at = donor.size();
        donor.insert(donor.end(), request.begin() + from, request.begin() + from + length);
        if (in.ConsumeBool()) {
          int& edited = donor[at + in.ConsumeIntegralInRange<std::size_t>(0, length - 1)];
          edited = (edited + 1) % alphabet;
        }
      } else {  // tokens of its own
        for (int n = in.ConsumeIntegralInRange(1, 40); n > 0; --n) donor.push_back(in.ConsumeIntegralInRange(0, alphabet - 1));
      }
    }
  }

  std::vector<TokenAlignment> per_donor;
  std::vector<std::vector<serving::AlignedRun>> runs;
  for (const std::vector<int>& donor : donors) {
    runs.push_back(serving::align_runs(request, donor, anchor));
    TokenAlignment a = serving::to_alignment(runs.back(), static_cast<int>(request.size()));
    check_counts(a, request.size());
    check_tokens(a, request, {donor});
    per_donor.push_back(std::move(a));
  }
  const TokenAlignment merged = serving::merge_alignments(runs, static_cast<int>(request.size()), min_run);
  check_counts(merged, request.size());
  check_tokens(merged, request, donors);
  check_merge(merged, per_donor, min_run);

  // Aligned with itself, a request keeps every token in place.
  if (static_cast<int>(request.size()) >= anchor) {
    const TokenAlignment self = serving::align_tokens(request, request, anchor);
    require(self.exact_prefix == static_cast<int>(request.size()));
  }
  return 0;
}
