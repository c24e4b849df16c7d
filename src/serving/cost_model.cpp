#include "serving/cost_model.hpp"

#include <algorithm>

namespace attention_echo::serving {

void CostModel::observe(int rows, double total_s, double attention_s) {
  rows_ += rows;
  pairs_ += pairs(0, rows);
  linear_s_ += total_s - attention_s;
  attention_s_ += attention_s;
}

void CostModel::observe_cache(int T, int p, double attention_s) {
  const double block = per_pair() * pairs(0, p);
  if (block <= 0) return;
  cache_factor_sum_ += std::clamp((attention_s - per_pair() * pairs(p, T)) / block, 0.0, 3.0);
  ++cache_requests_;
}

double CostModel::reuse(int T, int L) const { return per_row() * (T - L) + per_pair() * pairs(L, T); }

double CostModel::cache(int T, int p) const {
  const double factor = cache_requests_ ? cache_factor_sum_ / cache_requests_ : prior_;
  return per_row() * T + per_pair() * (pairs(p, T) + factor * pairs(0, p));
}

}  // namespace attention_echo::serving
