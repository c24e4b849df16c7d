// Exact multi-head attention (no cache): the kernel every tier is built on.
//
// out_i = sum_j softmax_j(scale * q_i . k_j) v_j over the keys row i sees,
// i and j positions in a sequence of T = k.tokens:
//   causal:      j <= i
//   non-causal:  j < prefix_length for rows i < prefix_length (the prefix is
//                a bidirectional block of its own), every j otherwise; with
//                prefix_length 0 this is plain bidirectional attention.
// q's (and out's) rows are positions [query_offset, T): 0 for every row, or
// the first new row when a chunked prefill or a decode step adds rows on top
// of keys already computed.
// Query head h reads kv head h / (H / Hkv) (GQA/MQA).
#pragma once

#include <optional>
#include <span>

#include "attention_echo/tensor.hpp"
#include "attention_echo/thread_pool.hpp"

namespace attention_echo {

struct AttentionOptions {
  std::optional<float> scale;  // default 1/sqrt(D)
  bool causal = true;
  int prefix_length = 0;       // only matters when causal == false
  int query_offset = 0;        // position of q's first row; q.tokens + query_offset == k.tokens
  // false: q, k and v are not scanned for NaN/Inf (which then reach out).
  // For callers whose inputs are their own outputs: the scan reads every key
  // row, as much memory as attending them, and was 6% of a 3200-token prefill
  // that computes its last 70 rows (the engine, 2-vCPU Xeon).
  bool check_finite = true;
};

// q [H, T - query_offset, D], k/v [Hkv, T, D], out like q. Validates shapes
// and values (std::invalid_argument naming the argument; values only with
// options.check_finite).
void attention(const HeadsView& q, const HeadsView& k, const HeadsView& v,
               const MutableHeadsView& out, const AttentionOptions& options, ThreadPool& pool);

// Only the query rows at positions `rows` (ascending) of attention(q, k, v):
// q is [H, T, D] like k but read at those rows alone; out is
// [H, rows.size(), D], its row r the output of position rows[r]. Each row is
// bit-identical to what attention() gives it. For forward passes that
// recompute scattered rows of a sequence (the KV-blend tier); needs
// options.query_offset == 0.
void attention_rows(const HeadsView& q, const HeadsView& k, const HeadsView& v, std::span<const int> rows,
                    const MutableHeadsView& out, const AttentionOptions& options, ThreadPool& pool);

// Name of the SIMD code path the kernels dispatch to on this CPU
// ("avx512", "avx2", "scalar").
const char* attention_isa();

}  // namespace attention_echo
