#include "serving/token_alignment.hpp"

#include <algorithm>
#include <bit>
#include <cstdlib>
#include <numeric>
#include <stdexcept>
#include <string>
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

void check_runs(std::span<const AlignedRun> runs, int tokens, const char* what) {
  if (tokens < 0) throw std::invalid_argument("tokens: must be non-negative");
  for (std::size_t r = 0; r < runs.size(); ++r)
    if (runs[r].start < (r ? runs[r - 1].end : 0) || runs[r].end <= runs[r].start || runs[r].end > tokens ||
        runs[r].donor_start < 0)
      throw std::invalid_argument(std::string(what) +
                                  ": runs must be ascending, disjoint, non-empty, within tokens and at donor "
                                  "positions >= 0");
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

std::vector<AlignedRun> align_runs(std::span<const int> request, const RequestKgrams& kgrams,
                                   std::span<const int> donor, const TokenAnchors& index) {
  const int anchor = index.anchor;
  const std::size_t kgram_count = request.size() >= std::size_t(anchor) ? request.size() - anchor + 1 : 0;
  if (kgrams.anchor != anchor || kgrams.hashes.size() != kgram_count)
    throw std::invalid_argument("kgrams: not a request of this length's k-grams at the donor's anchor length");
  const auto& anchors = index.sorted;
  const int T = static_cast<int>(request.size()), Td = static_cast<int>(donor.size());
  prefetch_donor(donor, index);
  const std::vector<std::uint64_t>& request_hashes = kgrams.hashes;

  std::vector<AlignedRun> runs;
  int offset = 0;  // donor - request position of the last run
  for (int i = 0; i < T;) {
    // Continue the current run while tokens keep matching.
    if (!runs.empty() && runs.back().end == i) {
      const int from = runs.back().donor_start + (i - runs.back().start);
      i += from < Td ? match_length(request.data() + i, donor.data() + from, std::min(T - i, Td - from)) : 0;
      runs.back().end = i;
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
    // positions straddled the edit), back to where the last run ended.
    const int floor = runs.empty() ? 0 : runs.back().end;
    int start = i, donor_start = best;
    while (start > floor && donor_start > 0 && request[start - 1] == donor[donor_start - 1]) --start, --donor_start;
    runs.push_back({start, i + anchor, donor_start});
    i += anchor;
  }
  return runs;
}

TokenAlignment to_alignment(std::span<const AlignedRun> runs, int tokens) {
  check_runs(runs, tokens, "runs");
  TokenAlignment a;
  a.donor_position.assign(tokens, -1);
  a.donor.assign(tokens, 0);
  for (const AlignedRun& r : runs)
    std::iota(a.donor_position.begin() + r.start, a.donor_position.begin() + r.end, r.donor_start);
  count_aligned(a);
  return a;
}

TokenAlignment align_tokens(std::span<const int> request, const RequestKgrams& kgrams, std::span<const int> donor,
                            const TokenAnchors& anchors) {
  return to_alignment(align_runs(request, kgrams, donor, anchors), static_cast<int>(request.size()));
}

TokenAlignment merge_alignments(std::span<const std::vector<AlignedRun>> per_donor, int tokens, int min_run) {
  if (per_donor.empty()) throw std::invalid_argument("per_donor: no alignment to merge");
  if (min_run < 1) throw std::invalid_argument("min_run: must be at least 1");
  for (const std::vector<AlignedRun>& runs : per_donor) check_runs(runs, tokens, "per_donor");
  // Every donor's runs of min_run or more, donor d's from runs[first[d]]
  // on; between two consecutive run boundaries (of any donor) the same run
  // wins every token.
  const int donors = static_cast<int>(per_donor.size());
  std::vector<AlignedRun> runs;
  std::vector<int> first(donors + 1, 0), cuts;
  for (int d = 0; d < donors; ++d) {
    first[d] = static_cast<int>(runs.size());
    for (const AlignedRun& r : per_donor[d])
      if (r.end - r.start >= min_run) {
        runs.push_back(r);
        cuts.insert(cuts.end(), {r.start, r.end});
      }
  }
  first[donors] = static_cast<int>(runs.size());
  std::sort(cuts.begin(), cuts.end());
  cuts.erase(std::unique(cuts.begin(), cuts.end()), cuts.end());

  TokenAlignment out;
  out.donor_position.assign(tokens, -1);
  out.donor.assign(tokens, 0);
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
    const AlignedRun& run = runs[current[best]];
    std::iota(out.donor_position.begin() + from, out.donor_position.begin() + to,
              run.donor_start + (from - run.start));
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
