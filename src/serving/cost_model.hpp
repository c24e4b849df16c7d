// The router's price list. CPU seconds (steady under other load) per prompt
// row (projections, MLP) and per causal (row, key) pair (attention) are
// fitted on forwards without reuse. What a cache-routed prefix block costs
// next to exact attention is learned from cache-routed prompts that found a
// candidate (misses after a rejection, guard rejections and hits together),
// starting from a prior. Prompts that found no candidate at all are left
// out: they are the price of filling the cache, and counting them would stop
// the router from ever trying the cache again after the first cold prompt.
//
// Blends are priced from the same fits by what they compute, times a
// correction learned from blends measured so far (overheads the row counts
// miss: donor copies, re-rotation, the guard), one per selection (kRunStart
// and kDeviation blends do different work besides their rows). A blend is
// measured by its wall time at the cores exact forwards keep busy, not by
// its CPU time: its serial parts (selection, donor copies, the guard) leave
// cores idle, which CPU time does not see and time to first token does (on
// a 2-core EPYC at 512 tokens blends ran at 1.7 cores where exact forwards
// ran at 1.97, so CPU time priced them 12-15% low; BENCHMARKS.md section 13).
#pragma once

namespace attention_echo::serving {

class CostModel {
 public:
  // prior: the expected cost of a cache-routed prefix block next to exact
  // attention before any was measured.
  explicit CostModel(double prior) : prior_(prior) {}
  // A forward over `rows` rows without reuse.
  void observe(int rows, double total_s, double attention_s);
  // A forward that computed rows exactly, in CPU and wall seconds: how many
  // cores such forwards keep busy.
  void observe_parallelism(double cpu_s, double wall_s);
  // A cache-routed forward over T rows with shared context p.
  void observe_cache(int T, int p, double attention_s);
  // Reuse the L stored rows, compute [L, T) exactly.
  double reuse(int T, int L) const;
  // Every row through the layers, the prefix block through the cache.
  double cache(int T, int p) const;

  // A blend past L stored rows: the QKV projections of [L, T) in one layer,
  // `selected` rows in every layer, and with first_layer_all
  // (BlendSelection::kDeviation) the rest of [L, T) through layer 0 as well.
  // qkv_share: the QKV projection's part of a row's linear cost.
  struct BlendShape {
    int T = 0, L = 0, selected = 0, layers = 1;
    double qkv_share = 0.25;
    bool first_layer_all = false;
  };
  // prior_factor: measured / modelled time of blends before this model
  // has measured any of its own (BlendCalibration::blend_cost_factor).
  double blend(const BlendShape& b, double prior_factor = 1.0) const;
  // What a blend measured (CPU and wall seconds) against what blend()
  // predicted for it.
  void observe_blend(const BlendShape& b, double cpu_s, double wall_s);
  // The mean measured / modelled time over observed blends of both
  // selections; 0 before any.
  double blend_factor() const;
  // What a blend is expected to cost: itself, plus the exact prefill that
  // replaces it at the rate the guard refuses (BlendCalibration::
  // refusal_rate): every layer of every row, or layers 1..L-1 with
  // first_layer_all (layer 0's output is kept). Where the guard keeps
  // refusing (a model or text whose calibration allows little deviation)
  // blending is routed around after a few tries, and tried again now and
  // then.
  double expected_blend(const BlendShape& b, double refusal_rate, double prior_factor = 1.0) const;

 private:
  // Causal (row, key) pairs of rows [a, b).
  static double pairs(int a, int b) { return (double(b) * (b + 1) - double(a) * (a + 1)) / 2; }
  double per_row() const { return rows_ > 0 ? linear_s_ / rows_ : 1.0; }
  double per_pair() const { return pairs_ > 0 ? attention_s_ / pairs_ : 1.0; }

  double rows_ = 0, pairs_ = 0, linear_s_ = 0, attention_s_ = 0;
  double prior_;
  double cache_factor_sum_ = 0;
  int cache_requests_ = 0;
  // Measured / modelled, over observed blends, by BlendShape::first_layer_all.
  double blend_factor_sum_[2] = {0, 0};
  int blends_[2] = {0, 0};
  double exact_cpu_s_ = 0, exact_wall_s_ = 0;  // exact forwards' (observe_parallelism)
};

}  // namespace attention_echo::serving
