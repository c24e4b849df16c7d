// The public exact attention(): validate, then every row through the kernel.
#include "attention_echo/attention.hpp"

#include <cmath>
#include <stdexcept>

#include "core/isa.hpp"
#include "core/validate.hpp"
#include "kernels/cpu_backend.hpp"

namespace attention_echo {

void attention(const HeadsView& q, const HeadsView& k, const HeadsView& v, const MutableHeadsView& out,
               const AttentionOptions& options, ThreadPool& pool) {
  validate_attention_inputs(q, k, v, out, options.prefix_length, options.query_offset, options.check_finite);
  if (options.scale) validate_scale(*options.scale);
  const float scale = options.scale.value_or(1.0f / std::sqrt(static_cast<float>(q.dim)));
  const kernels::AttentionProblem problem{q, k, v, out, scale, options.causal, options.prefix_length,
                                          options.query_offset};
  kernels::CpuBackend(pool).exact_rows(problem, options.query_offset, k.tokens);
}

void attention_rows(const HeadsView& q, const HeadsView& k, const HeadsView& v, std::span<const int> rows,
                    const MutableHeadsView& out, const AttentionOptions& options, ThreadPool& pool) {
  if (options.query_offset != 0) throw std::invalid_argument("query_offset: must be 0 with rows");
  validate_attention_rows(q, k, v, rows, out, options.check_finite);
  if (options.scale) validate_scale(*options.scale);
  const float scale = options.scale.value_or(1.0f / std::sqrt(static_cast<float>(q.dim)));
  // The problem's out is never written by selected_rows; q stands in for its shape.
  const MutableHeadsView unused{nullptr, q.heads, q.tokens, q.dim, q.head_stride, q.token_stride, q.device};
  const kernels::AttentionProblem problem{q, k, v, unused, scale, options.causal, options.prefix_length};
  kernels::CpuBackend(pool).selected_rows(problem, rows, out);
}

const char* attention_isa() { return to_string(active_isa()); }

}  // namespace attention_echo
