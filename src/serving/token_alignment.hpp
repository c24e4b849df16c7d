// Token alignment of a request against a donor (a stored request whose K/V
// the KV-blend tier reuses). For every request position it names the donor
// position holding the same token in a run of matching tokens, or -1 where
// the token has to be computed. Handles substitutions, insertions and
// deletions (runs resume after the edit) and chunks that moved (runs are
// anchored by k-gram hashes at any donor position, the nearest to where the
// previous run would continue winning), so RAG passages in another order
// still align. Alignments against several donors merge into one that takes
// each token from the donor sharing the longest context before it.
#pragma once

#include <cstdint>
#include <span>
#include <utility>
#include <vector>

namespace attention_echo::serving {

struct TokenAlignment {
  std::vector<int> donor_position;  // per request token: its position in the donor, or -1
  std::vector<int> donor;           // per request token: which donor (merge_alignments' order; 0 for one)
  int aligned = 0;                  // tokens with a donor position
  int moved = 0;                    // aligned tokens whose position differs (K is re-rotated)
  int exact_prefix = 0;             // leading tokens aligned to the same position
};

// A donor's k-gram index: the hash of every run of `anchor` tokens with its
// position, sorted by hash. Built once per stored prompt, so aligning a
// request against it costs O(request) plus a lookup per broken run.
struct TokenAnchors {
  int anchor = 8;  // tokens a run must share before it is taken (shorter
                   // coincidences are not worth reusing: their context differs)
  std::vector<std::pair<std::uint64_t, int>> sorted;
  // A filter over the hashes (16 bits per k-gram, a power of two of 64-bit
  // words; each k-gram sets three bits of one word): most lookups are of
  // k-grams the donor lacks (an edit's own tokens, a fresh tail), and a
  // cold binary search for each cost ~60% of a planner lookup at 1e4
  // stored prompts. One bit per k-gram let 6% of those through, and their
  // binary searches, a cache miss a step, were a sixth of an alignment's
  // time in bench_planner; three bits in one word let 0.75% through for the
  // same one-word read (tests/test_serving_store.cpp).
  std::vector<std::uint64_t> filter;
  std::uint64_t filter_mask(std::uint64_t hash) const {
    // The rolling hash's low bits depend only on the tokens' low bits: mix first.
    const std::uint64_t h = hash * 0x9e3779b97f4a7c15ULL;
    return std::uint64_t{1} << (h >> 58) | std::uint64_t{1} << (h >> 52 & 63) | std::uint64_t{1} << (h >> 46 & 63);
  }
  std::size_t filter_word(std::uint64_t hash) const {
    return static_cast<std::size_t>((hash * 0xc2b2ae3d27d4eb4fULL) >> 20) & (filter.size() - 1);
  }
  bool may_hold(std::uint64_t hash) const {
    if (filter.empty()) return false;
    const std::uint64_t mask = filter_mask(hash);
    return (filter[filter_word(hash)] & mask) == mask;
  }
  std::size_t bytes() const { return sorted.size() * sizeof(sorted[0]) + filter.size() * sizeof(filter[0]); }
};
// Throws std::invalid_argument for anchor < 1.
TokenAnchors index_anchors(std::span<const int> donor, int anchor = 8);

// A request's side of the anchors: the hash of its `anchor` tokens from
// every position (request length - anchor + 1 of them, or none), hashed
// once however many donors the request is aligned against (the planner
// aligns up to four per lookup).
struct RequestKgrams {
  int anchor = 8;
  std::vector<std::uint64_t> hashes;
};
// Throws std::invalid_argument for anchor < 1.
RequestKgrams request_kgrams(std::span<const int> request, int anchor = 8);

// Starts fetching what aligning against a donor reads (its tokens and
// anchor filter) into the cache. A donor is cold, one of thousands of
// stored prompts, and the walk reads its tokens and filter a load per step:
// align_runs fetches them all at once rather than miss per step, and a
// caller aligning several donors fetches them all before the first.
void prefetch_donor(std::span<const int> donor, const TokenAnchors& anchors);

// Request tokens [start, end) that equal the donor's from donor_start on.
struct AlignedRun {
  int start = 0;
  int end = 0;
  int donor_start = 0;
  friend bool operator==(const AlignedRun&, const AlignedRun&) = default;
};

// The request's runs in the donor, ascending and disjoint (two may touch,
// at different donor offsets). Throws std::invalid_argument when `kgrams`
// are not the request's at the donor index's anchor length.
std::vector<AlignedRun> align_runs(std::span<const int> request, const RequestKgrams& kgrams,
                                   std::span<const int> donor, const TokenAnchors& anchors);
inline std::vector<AlignedRun> align_runs(std::span<const int> request, std::span<const int> donor, int anchor = 8) {
  return align_runs(request, request_kgrams(request, anchor), donor, index_anchors(donor, anchor));
}

// One donor's runs as an alignment of a request of `tokens` tokens. Throws
// std::invalid_argument unless the runs are ascending, disjoint, non-empty,
// within [0, tokens) and at donor positions >= 0.
TokenAlignment to_alignment(std::span<const AlignedRun> runs, int tokens);

// align_runs as an alignment (to_alignment).
TokenAlignment align_tokens(std::span<const int> request, const RequestKgrams& kgrams, std::span<const int> donor,
                            const TokenAnchors& anchors);
inline TokenAlignment align_tokens(std::span<const int> request, std::span<const int> donor, int anchor = 8) {
  return align_tokens(request, request_kgrams(request, anchor), donor, index_anchors(donor, anchor));
}

// Runs shorter than this are not reused: every row of one lies within 64
// rows past a break, where reused K/V deviates most (BENCHMARKS.md section
// 8), and most are coincidences (on a byte-level model, 8 characters such
// as "#define _" recur across unrelated C headers: one chatbot prompt
// aligned 1889 of its 2618 rows to another header, 1568 of them in runs
// under 64 tokens, and its blend measured guard-row KL 1.4e-2). One K/V
// block.
inline constexpr int kMinRun = 64;

// One request's runs in several donors (align_runs, in the donors' order)
// as one alignment of its `tokens` tokens, runs shorter than min_run
// dropped: each token takes the donor whose run through it began earliest,
// the earlier donor on a tie (so no token switches between runs that began
// together). A reused row's K/V deviates most just past the place where its
// donor's context stops being the request's and less the longer the shared
// run before it (BENCHMARKS.md section 8), so the longest shared context is
// the least deviation: RAG passages in a new order take each passage from
// a donor where it followed the same one, and an edited file's rows past
// one donor's own edit come from a donor without it. It takes runs, not
// per-token alignments: the planner merges on every lookup, and aligning
// four donors per token and merging them were 28% of one at 1e4 stored
// prompts, the merge's scan for runs about half of its part (BENCHMARKS.md
// section 5). Throws std::invalid_argument unless there is at least one
// donor's runs, each donor's are valid runs of `tokens` (to_alignment) and
// min_run >= 1.
TokenAlignment merge_alignments(std::span<const std::vector<AlignedRun>> per_donor, int tokens,
                                int min_run = kMinRun);

// Whether the alignment moves text: some aligned token's offset (donor
// position minus request position) differs from the aligned token's before
// it (or, for the first, from 0) by more than max_shift tokens, as passages
// in another order do and an edit of up to max_shift inserted or deleted
// tokens does not.
bool moves_text(const TokenAlignment& alignment, int max_shift = kMinRun);

}  // namespace attention_echo::serving
