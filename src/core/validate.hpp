// Input checks shared by every public entry point. Each throws
// std::invalid_argument whose message starts with the argument's name, and
// runs before any state (cache, output) is touched.
#pragma once

#include <span>
#include <string_view>

#include "attention_echo/tensor.hpp"

namespace attention_echo {

// q [H,Tq,D], k/v [Hkv,T,D], out like q, all on one device; only k and v
// may be paged, both alike, page_tokens a multiple of kKeyChunk; Hkv divides H;
// Tq, T, D >= 1; query_offset >= 0 and query_offset + Tq == T (q's rows are
// positions [query_offset, T) of the sequence); 0 <= prefix_length <= T.
// q/k/v finite, checked here for host memory only (and with check_finite):
// device memory is its backend's to check.
void validate_attention_inputs(const HeadsView& q, const HeadsView& k, const HeadsView& v,
                               const MutableHeadsView& out, int prefix_length, int query_offset = 0,
                               bool check_finite = true);

// The same for views of any dtype, query_offset 0: k, v and out of q's
// dtype; float32 host views are checked as above, device views for shapes
// only (their backend checks dtype and layout).
void validate_attention_inputs(const AnyHeadsView& q, const AnyHeadsView& k, const AnyHeadsView& v,
                               const MutableAnyHeadsView& out, int prefix_length);

// q/k/v as above with query_offset 0; rows ascending in [0, T); out
// [H, rows.size(), D]; only q's rows at `rows` are read (and checked, with
// check_finite).
void validate_attention_rows(const HeadsView& q, const HeadsView& k, const HeadsView& v, std::span<const int> rows,
                             const MutableHeadsView& out, bool check_finite = true);

// rows, cols >= 1, in host memory (the semantic key is computed there) and
// every value finite.
void validate_matrix(std::string_view name, const MatrixView& m);

// Scale must be finite and positive.
void validate_scale(float scale);

}  // namespace attention_echo
