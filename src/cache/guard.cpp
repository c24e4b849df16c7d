#include "cache/guard.hpp"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

namespace attention_echo::cache {
namespace {

// count rows spread over [0, prefix), one per stratum at a fixed
// pseudo-random offset, so the guard samples the whole prefix the same way
// every run.
std::vector<int> guard_rows(int prefix, int count) {
  count = std::min(count, prefix);
  std::vector<int> rows(count);
  std::uint64_t state = 0x9e3779b97f4a7c15ULL;
  for (int r = 0; r < count; ++r) {
    state = state * 6364136223846793005ULL + 1442695040888963407ULL;
    const double offset = static_cast<double>(state >> 11) / 9007199254740992.0;  // [0, 1)
    rows[r] = std::min(prefix - 1, static_cast<int>((r + offset) * prefix / count));
  }
  return rows;
}

}  // namespace

Guard::Verdict Guard::check(const kernels::AnyAttentionProblem& problem, int rows,
                            const kernels::Backend& backend) const {
  if (!std::isfinite(max_error_)) return {std::numeric_limits<double>::quiet_NaN(), 0.0, true};
  const std::vector<int> check = guard_rows(rows, verify_rows_);
  const double error = backend.max_row_error(problem, check);
  double flops = 0.0;
  for (int row : check) flops += 4.0 * problem.out.heads * problem.out.dim * problem.key_end(row);
  return {error, flops, !(error > max_error_)};
}

}  // namespace attention_echo::cache
