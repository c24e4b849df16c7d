// Input checks shared by every public entry point. Each throws
// std::invalid_argument whose message starts with the argument's name, and
// runs before any state (cache, output) is touched.
#pragma once

#include <string_view>

#include "attention_echo/tensor.hpp"

namespace attention_echo {

struct MatrixView;

// q [H,T,D], k/v [Hkv,T,D], out like q; Hkv divides H; T, D >= 1; q/k/v finite;
// 0 <= prefix_length <= T.
void validate_attention_inputs(const HeadsView& q, const HeadsView& k, const HeadsView& v,
                               const MutableHeadsView& out, int prefix_length);

// rows, cols >= 1 and every value finite.
void validate_matrix(std::string_view name, const MatrixView& m);

// Scale must be finite and positive.
void validate_scale(float scale);

}  // namespace attention_echo
