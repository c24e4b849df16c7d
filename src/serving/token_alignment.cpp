#include "serving/token_alignment.hpp"

#include <algorithm>
#include <bit>
#include <cstdlib>
#include <numeric>
#include <stdexcept>
#include <utility>

namespace attention_echo::serving {
namespace {

constexpr std::uint64_t kBase = 0x100000001b3ULL;

// Polynomial hashes of every k-gram of `tokens` (from each position), rolled
// in O(n).
std::vector<std::uint64_t> kgram_hashes(std::span<const int> tokens, int k) {
  std::vector<std::uint64_t> out;
  if (static_cast<int>(tokens.size()) < k) return out;
  std::uint64_t top = 1;  // kBase^(k-1)
  for (int j = 1; j < k; ++j) top *= kBase;
  std::uint64_t h = 0;
  for (int j = 0; j < k; ++j) h = h * kBase + static_cast<std::uint32_t>(tokens[j]);
  out.reserve(tokens.size() - k + 1);
  out.push_back(h);
  for (std::size_t i = k; i < tokens.size(); ++i) {
    h = (h - top * static_cast<std::uint32_t>(tokens[i - k])) * kBase + static_cast<std::uint32_t>(tokens[i]);
    out.push_back(h);
  }
  return out;
}

bool same_run(std::span<const int> a, int i, std::span<const int> b, int j, int k) {
  return std::equal(a.begin() + i, a.begin() + i + k, b.begin() + j);
}

// How many of a[0..n) equal b[0..n) before the first difference. Runs are
// hundreds of tokens long, so they are compared sixteen at a time with one
// branch each (two thirds the time of a token-by-token walk, which was most
// of an alignment).
int match_length(const int* a, const int* b, int n) {
  int m = 0;
  for (; m + 16 <= n; m += 16) {
    int diff = 0;
    for (int k = 0; k < 16; ++k) diff |= a[m + k] ^ b[m + k];
    if (diff != 0) break;
  }
  while (m < n && a[m] == b[m]) ++m;
  return m;
}

// Where the run of consecutive donor positions through pos[i] >= 0 ends:
// the first k > i whose offset pos[k] - k differs from pos[i] - i (an
// unaligned -1 past i always does). Sixteen at a time, as match_length.
int run_end(const int* pos, int i, int n) {
  const int offset = pos[i] - i;
  int k = i + 1;
  for (; k + 16 <= n; k += 16) {
    int diff = 0;
    for (int j = 0; j < 16; ++j) diff |= (pos[k + j] - (k + j)) ^ offset;
    if (diff != 0) break;
  }
  while (k < n && pos[k] - k == offset) ++k;
  return k;
}

// The counts of an alignment from its donor positions, kept in locals:
// through the reference every write could alias the positions, so the
// compiler kept nothing in registers (a quarter of a merge's time).
void count_aligned(TokenAlignment& a) {
  const std::vector<int>& pos = a.donor_position;
  const int T = static_cast<int>(pos.size());
  int aligned = 0, moved = 0, exact = 0;
  for (int i = 0; i < T; ++i) {
    aligned += pos[i] >= 0;
    moved += pos[i] >= 0 && pos[i] != i;
  }
  while (exact < T && pos[exact] == exact) ++exact;
  a.aligned = aligned;
  a.moved = moved;
  a.exact_prefix = exact;
}

}  // namespace

TokenAnchors index_anchors(std::span<const int> donor, int anchor) {
  if (anchor < 1) throw std::invalid_argument("anchor: must be at least 1");
  TokenAnchors index{anchor, {}, {}};
  const std::vector<std::uint64_t> hashes = kgram_hashes(donor, anchor);
  index.sorted.reserve(hashes.size());
  for (std::size_t at = 0; at < hashes.size(); ++at) index.sorted.emplace_back(hashes[at], static_cast<int>(at));
  std::sort(index.sorted.begin(), index.sorted.end());
  if (index.sorted.empty()) return index;
  index.filter.assign(std::bit_ceil(std::max<std::size_t>(1, index.sorted.size() / 4)), 0);  // 16 bits each
  for (const auto& [h, at] : index.sorted) index.filter[index.filter_word(h)] |= index.filter_mask(h);
  return index;
}

RequestKgrams request_kgrams(std::span<const int> request, int anchor) {
  if (anchor < 1) throw std::invalid_argument("anchor: must be at least 1");
  return {anchor, kgram_hashes(request, anchor)};
}

void prefetch_donor(std::span<const int> donor, const TokenAnchors& anchors) {
  for (std::size_t w = 0; w < anchors.filter.size(); w += 64 / sizeof(std::uint64_t))
    __builtin_prefetch(&anchors.filter[w]);
  for (std::size_t t = 0; t < donor.size(); t += 64 / sizeof(int)) __builtin_prefetch(&donor[t]);
}

TokenAlignment align_tokens(std::span<const int> request, const RequestKgrams& kgrams, std::span<const int> donor,
                            const TokenAnchors& index) {
  const int anchor = index.anchor;
  const std::size_t kgram_count = request.size() >= std::size_t(anchor) ? request.size() - anchor + 1 : 0;
  if (kgrams.anchor != anchor || kgrams.hashes.size() != kgram_count)
    throw std::invalid_argument("kgrams: not a request of this length's k-grams at the donor's anchor length");
  const auto& anchors = index.sorted;
  const int T = static_cast<int>(request.size()), Td = static_cast<int>(donor.size());
  TokenAlignment a;
  a.donor_position.assign(T, -1);
  a.donor.assign(T, 0);
  std::vector<int>& pos = a.donor_position;
  prefetch_donor(donor, index);
  const std::vector<std::uint64_t>& request_hashes = kgrams.hashes;

  int offset = 0;  // donor - request position of the last run
  for (int i = 0; i < T;) {
    // Continue the current run while tokens keep matching.
    if (i > 0 && pos[i - 1] >= 0) {
      const int from = pos[i - 1] + 1;
      const int run = from < Td ? match_length(request.data() + i, donor.data() + from, std::min(T - i, Td - from)) : 0;
      std::iota(pos.begin() + i, pos.begin() + i + run, from);
      i += run;
      if (i == T) break;
    }
    // Then anchor a new run: the matching k-gram nearest to the old offset.
    int best = -1;
    const int resume = i + offset;  // the run resuming at the old offset is the nearest there can be
    if (i + anchor <= T && resume >= 0 && resume + anchor <= Td && same_run(request, i, donor, resume, anchor)) {
      best = resume;
    } else if (i + anchor <= T && index.may_hold(request_hashes[i])) {
      const std::uint64_t h = request_hashes[i];
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
  // The planner merges on every lookup, so by runs, not tokens: every
  // donor's runs of min_run or more as [start, end), donor d's from
  // runs[first[d]] on; between two consecutive run boundaries (of any
  // donor) the same run wins every token.
  const int n = static_cast<int>(T), donors = static_cast<int>(per_donor.size());
  struct Run {
    int start, end;
  };
  std::vector<Run> runs;
  std::vector<int> first(donors + 1, 0), cuts;
  for (int d = 0; d < donors; ++d) {
    first[d] = static_cast<int>(runs.size());
    const int* pos = per_donor[d].donor_position.data();
    for (int i = 0; i < n;) {
      if (pos[i] < 0) {
        ++i;
        continue;
      }
      const int end = run_end(pos, i, n);
      if (end - i >= min_run) {
        runs.push_back({i, end});
        cuts.insert(cuts.end(), {i, end});
      }
      i = end;
    }
  }
  first[donors] = static_cast<int>(runs.size());
  std::sort(cuts.begin(), cuts.end());
  cuts.erase(std::unique(cuts.begin(), cuts.end()), cuts.end());

  TokenAlignment out;
  out.donor_position.assign(T, -1);
  out.donor.assign(T, 0);
  std::vector<int> current(first.begin(), first.end() - 1);  // per donor: its first run not yet behind us
  for (std::size_t c = 0; c + 1 < cuts.size(); ++c) {
    const int from = cuts[c], to = cuts[c + 1];
    int best = -1;  // the covering run that began earliest; on a tie the earlier donor's
    for (int d = 0; d < donors; ++d) {
      while (current[d] < first[d + 1] && runs[current[d]].end <= from) ++current[d];
      if (current[d] == first[d + 1] || runs[current[d]].start > from) continue;
      if (best < 0 || runs[current[d]].start < runs[current[best]].start) best = d;
    }
    if (best < 0) continue;
    const auto& pos = per_donor[best].donor_position;
    std::copy(pos.begin() + from, pos.begin() + to, out.donor_position.begin() + from);
    std::fill(out.donor.begin() + from, out.donor.begin() + to, best);
  }
  count_aligned(out);
  return out;
}

bool moves_text(const TokenAlignment& alignment, int max_shift) {
  int offset = 0;
  for (std::size_t i = 0; i < alignment.donor_position.size(); ++i) {
    if (alignment.donor_position[i] < 0) continue;
    const int here = alignment.donor_position[i] - static_cast<int>(i);
    if (std::abs(here - offset) > max_shift) return true;
    offset = here;
  }
  return false;
}

}  // namespace attention_echo::serving
