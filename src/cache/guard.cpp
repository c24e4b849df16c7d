#include "cache/guard.hpp"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <span>
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

// Max over heads of ||echo - exact|| / ||exact|| on the guard rows.
double relative_error(const MutableHeadsView& out, std::span<const int> rows, const std::vector<float>& exact) {
  double worst = 0.0;
  const int dim = out.dim;
  for (int h = 0; h < out.heads; ++h) {
    double diff2 = 0.0, ref2 = 0.0;
    for (std::size_t r = 0; r < rows.size(); ++r) {
      const float* echo = out.row(h, rows[r]);
      const float* ref = exact.data() + (h * rows.size() + r) * dim;
      for (int d = 0; d < dim; ++d) {
        const double e = double(echo[d]) - double(ref[d]);
        diff2 += e * e;
        ref2 += double(ref[d]) * ref[d];
      }
    }
    worst = std::max(worst, ref2 > 0.0 ? std::sqrt(diff2 / ref2) : std::sqrt(diff2));
  }
  return worst;
}

}  // namespace

Guard::Verdict Guard::check(const kernels::AttentionProblem& problem, int rows,
                            const kernels::Backend& backend) const {
  if (!std::isfinite(max_error_)) return {std::numeric_limits<double>::quiet_NaN(), 0.0, true};
  const std::vector<int> check = guard_rows(rows, verify_rows_);
  const int heads = problem.out.heads, dim = problem.out.dim;
  std::vector<float> exact(static_cast<std::size_t>(heads) * check.size() * dim);
  backend.selected_rows(problem, check,
                        MutableHeadsView::contiguous(exact.data(), heads, static_cast<int>(check.size()), dim));
  const double error = relative_error(problem.out, check, exact);
  double flops = 0.0;
  for (int row : check) flops += 4.0 * heads * dim * problem.key_end(row);
  return {error, flops, !(error > max_error_)};
}

}  // namespace attention_echo::cache
