#include "serving/token_alignment.hpp"

#include <algorithm>
#include <bit>
#include <cstdlib>
#include <stdexcept>
#include <utility>

namespace attention_echo::serving {
namespace {

constexpr std::uint64_t kBase = 0x100000001b3ULL;

// Polynomial hashes of every k-gram of `tokens`, rolled in O(n).
std::vector<std::pair<std::uint64_t, int>> kgram_hashes(std::span<const int> tokens, int k) {
  std::vector<std::pair<std::uint64_t, int>> out;
  if (static_cast<int>(tokens.size()) < k) return out;
  std::uint64_t top = 1;  // kBase^(k-1)
  for (int j = 1; j < k; ++j) top *= kBase;
  std::uint64_t h = 0;
  for (int j = 0; j < k; ++j) h = h * kBase + static_cast<std::uint32_t>(tokens[j]);
  out.reserve(tokens.size() - k + 1);
  out.emplace_back(h, 0);
  for (std::size_t i = k; i < tokens.size(); ++i) {
    h = (h - top * static_cast<std::uint32_t>(tokens[i - k])) * kBase + static_cast<std::uint32_t>(tokens[i]);
    out.emplace_back(h, static_cast<int>(i - k + 1));
  }
  return out;
}

bool same_run(std::span<const int> a, int i, std::span<const int> b, int j, int k) {
  return std::equal(a.begin() + i, a.begin() + i + k, b.begin() + j);
}

// Per token: whether it lies in a run (tokens aligned to consecutive donor
// positions) of at least min_run tokens.
std::vector<char> in_long_run(const std::vector<int>& pos, int min_run) {
  std::vector<char> out(pos.size(), 0);
  for (std::size_t i = 0; i < pos.size();) {
    if (pos[i] < 0) {
      ++i;
      continue;
    }
    std::size_t end = i + 1;
    while (end < pos.size() && pos[end] >= 0 && pos[end] == pos[end - 1] + 1) ++end;
    if (end - i >= static_cast<std::size_t>(min_run)) std::fill(out.begin() + i, out.begin() + end, 1);
    i = end;
  }
  return out;
}

// The counts of an alignment from its donor positions.
void count_aligned(TokenAlignment& a) {
  const std::vector<int>& pos = a.donor_position;
  const int T = static_cast<int>(pos.size());
  for (int i = 0; i < T; ++i) {
    if (pos[i] < 0) continue;
    ++a.aligned;
    a.moved += pos[i] != i;
  }
  while (a.exact_prefix < T && pos[a.exact_prefix] == a.exact_prefix) ++a.exact_prefix;
}

}  // namespace

TokenAnchors index_anchors(std::span<const int> donor, int anchor) {
  if (anchor < 1) throw std::invalid_argument("anchor: must be at least 1");
  TokenAnchors index{anchor, kgram_hashes(donor, anchor), {}};
  std::sort(index.sorted.begin(), index.sorted.end());
  if (index.sorted.empty()) return index;
  index.filter.assign(std::bit_ceil(std::max<std::size_t>(1, index.sorted.size() / 4)), 0);  // 16 bits each
  for (const auto& [h, at] : index.sorted) {
    const std::uint64_t bit = index.filter_bit(h);
    index.filter[bit / 64] |= std::uint64_t{1} << (bit % 64);
  }
  return index;
}

TokenAlignment align_tokens(std::span<const int> request, std::span<const int> donor, const TokenAnchors& index) {
  const int anchor = index.anchor;
  const auto& anchors = index.sorted;
  const int T = static_cast<int>(request.size()), Td = static_cast<int>(donor.size());
  TokenAlignment a;
  a.donor_position.assign(T, -1);
  a.donor.assign(T, 0);
  std::vector<int>& pos = a.donor_position;
  // The donor is cold (one of thousands of stored prompts) and the walk
  // below touches its tokens and filter with a load per step: fetch them
  // all at once rather than miss per step.
  for (std::size_t w = 0; w < index.filter.size(); w += 64 / sizeof(std::uint64_t))
    __builtin_prefetch(&index.filter[w]);
  for (std::size_t t = 0; t < donor.size(); t += 64 / sizeof(int)) __builtin_prefetch(&donor[t]);
  const auto request_hashes = kgram_hashes(request, anchor);

  int offset = 0;  // donor - request position of the last run
  for (int i = 0; i < T;) {
    // Continue the current run while tokens keep matching.
    if (i > 0 && pos[i - 1] >= 0 && pos[i - 1] + 1 < Td && donor[pos[i - 1] + 1] == request[i]) {
      pos[i] = pos[i - 1] + 1;
      ++i;
      continue;
    }
    // Else anchor a new run: the matching k-gram nearest to the old offset.
    int best = -1;
    const int resume = i + offset;  // the run resuming at the old offset is the nearest there can be
    if (i + anchor <= T && resume >= 0 && resume + anchor <= Td && same_run(request, i, donor, resume, anchor)) {
      best = resume;
    } else if (i + anchor <= T && index.may_hold(request_hashes[i].first)) {
      const std::uint64_t h = request_hashes[i].first;
      auto it = std::lower_bound(anchors.begin(), anchors.end(), std::make_pair(h, -1));
      for (; it != anchors.end() && it->first == h; ++it)
        if (same_run(request, i, donor, it->second, anchor) &&
            (best < 0 || std::abs(it->second - i - offset) < std::abs(best - i - offset)))
          best = it->second;
    }
    if (best < 0) {
      ++i;
      continue;
    }
    offset = best - i;
    // Take matching tokens just before the anchor too (the k-gram at those
    // positions straddled the edit).
    for (int b = i - 1, j = best - 1; b >= 0 && j >= 0 && pos[b] < 0 && request[b] == donor[j]; --b, --j) pos[b] = j;
    for (int n = 0; n < anchor; ++n) pos[i + n] = best + n;
    i += anchor;
  }
  count_aligned(a);
  return a;
}

TokenAlignment merge_alignments(std::span<const TokenAlignment> per_donor, int min_run) {
  if (per_donor.empty()) throw std::invalid_argument("per_donor: no alignment to merge");
  if (min_run < 1) throw std::invalid_argument("min_run: must be at least 1");
  const std::size_t T = per_donor.front().donor_position.size();
  for (const TokenAlignment& a : per_donor)
    if (a.donor_position.size() != T) throw std::invalid_argument("per_donor: alignments of different requests");
  TokenAlignment out;
  out.donor_position.assign(T, -1);
  out.donor.assign(T, 0);
  std::vector<std::vector<char>> usable;
  for (const TokenAlignment& a : per_donor) usable.push_back(in_long_run(a.donor_position, min_run));
  std::vector<std::size_t> run_start(per_donor.size(), 0);  // per donor: where its run through token i began
  int previous = -1;  // the previous token's donor
  for (std::size_t i = 0; i < T; ++i) {
    int best = -1;
    for (std::size_t d = 0; d < per_donor.size(); ++d) {
      const std::vector<int>& pos = per_donor[d].donor_position;
      if (!usable[d][i]) continue;
      if (i == 0 || pos[i - 1] < 0 || pos[i - 1] + 1 != pos[i]) run_start[d] = i;
      const int candidate = static_cast<int>(d);
      if (best < 0 || run_start[d] < run_start[best] || (run_start[d] == run_start[best] && candidate == previous))
        best = candidate;
    }
    if (best < 0) continue;
    out.donor_position[i] = per_donor[best].donor_position[i];
    out.donor[i] = best;
    previous = best;
  }
  count_aligned(out);
  return out;
}

}  // namespace attention_echo::serving
