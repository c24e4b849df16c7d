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

namespace {

double modelled_blend(double per_row, double per_pair, const CostModel::BlendShape& b,
                      double (*pairs)(int, int)) {
  const int n = b.T - b.L;
  // Selected rows sit anywhere in [L, T): their keys average (L + T) / 2.
  const double deep = per_row * b.selected + per_pair * b.selected * 0.5 * (b.L + b.T);
  const double projections = b.qkv_share * per_row * n;
  if (!b.first_layer_all) return (projections + b.layers * deep) / b.layers;
  const double first = per_row * n + per_pair * pairs(b.L, b.T);
  return (first + projections + (b.layers - 1) * deep) / b.layers;
}

}  // namespace

double CostModel::blend(const BlendShape& b, double prior_factor) const {
  // This selection's measured factor, else the other's (this machine's
  // load, not calibrate()'s), else the prior.
  const int own = b.first_layer_all, other = 1 - own;
  const double factor = blends_[own]    ? blend_factor_sum_[own] / blends_[own]
                        : blends_[other] ? blend_factor_sum_[other] / blends_[other]
                                         : prior_factor;
  return factor * modelled_blend(per_row(), per_pair(), b, &CostModel::pairs);
}

double CostModel::blend_factor() const {
  const int n = blends_[0] + blends_[1];
  return n ? (blend_factor_sum_[0] + blend_factor_sum_[1]) / n : 0.0;
}

void CostModel::observe_parallelism(double cpu_s, double wall_s) {
  if (!(cpu_s > 0) || !(wall_s > 0)) return;
  exact_cpu_s_ += cpu_s;
  exact_wall_s_ += wall_s;
}

double CostModel::expected_blend(const BlendShape& b, double refusal_rate, double prior_factor) const {
  const int exact_layers = b.first_layer_all ? b.layers - 1 : b.layers;  // kDeviation keeps layer 0's output
  return blend(b, prior_factor) + refusal_rate * reuse(b.T, b.L) * exact_layers / b.layers;
}

void CostModel::observe_blend(const BlendShape& b, double cpu_s, double wall_s) {
  const double modelled = modelled_blend(per_row(), per_pair(), b, &CostModel::pairs);
  if (modelled <= 0) return;
  // Its wall time at the exact forwards' parallelism: CPU seconds as the
  // rates count them, idle cores included.
  const double cost = exact_wall_s_ > 0 && wall_s > 0 ? wall_s * exact_cpu_s_ / exact_wall_s_ : cpu_s;
  blend_factor_sum_[b.first_layer_all] += std::clamp(cost / modelled, 0.5, 4.0);
  ++blends_[b.first_layer_all];
}

}  // namespace attention_echo::serving
