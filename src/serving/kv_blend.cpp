#include "serving/kv_blend.hpp"

#include <algorithm>
#include <array>
#include <cmath>
#include <cstring>
#include <numeric>
#include <stdexcept>
#include <string>

namespace attention_echo::serving {
namespace {

using llama::Engine;
using llama::KVState;

std::vector<double> log_softmax(std::span<const float> logits) {
  const double max = *std::max_element(logits.begin(), logits.end());
  double sum = 0.0;
  for (float l : logits) sum += std::exp(l - max);
  const double log_sum = std::log(sum);
  std::vector<double> out(logits.size());
  for (std::size_t i = 0; i < logits.size(); ++i) out[i] = logits[i] - max - log_sum;
  return out;
}

double entropy(const std::vector<double>& log_p) {
  double h = 0.0;
  for (double l : log_p) h -= std::exp(l) * l;
  return std::max(h, 0.0);
}

// KL(p || q), nats.
double kl(const std::vector<double>& log_p, const std::vector<double>& log_q) {
  double d = 0.0;
  for (std::size_t i = 0; i < log_p.size(); ++i) d += std::exp(log_p[i]) * (log_p[i] - log_q[i]);
  return std::max(d, 0.0);
}

// Squared L2 distance and squared norm of a fresh K/V row pair against a
// donor's, accumulated.
struct Deviation {
  double diff2 = 0.0, norm2 = 0.0;
  void add(const float* fresh, const float* donor, int n) {
    for (int d = 0; d < n; ++d) {
      const double e = double(fresh[d]) - double(donor[d]);
      diff2 += e * e;
      norm2 += double(fresh[d]) * fresh[d];
    }
  }
  double relative() const { return norm2 > 0.0 ? std::sqrt(diff2 / norm2) : std::sqrt(diff2); }
};

class Blend {
 public:
  Blend(Engine& engine, std::span<const int> tokens, std::span<const KVState> donors, const TokenAlignment& alignment,
        KVState& kv, const BlendConfig& options, const BlendGuard& guard, RefusedBlend refused)
      : e_(engine),
        c_(engine.config()),
        tokens_(tokens),
        donors_(donors),
        align_(alignment),
        kv_(kv),
        opt_(options),
        guard_(guard),
        on_refusal_(refused),
        max_deviation_(std::min(options.max_error, guard.deviation)),
        T_(static_cast<int>(tokens.size())),
        skip_(kv.length),
        kvd_(c_.kv_dim()) {}

  BlendOutcome run(llama::ForwardResult& result) {
    // Rows past the skip, all of this prompt's own pages (the page where
    // the stored prefix ends is copied here, if shared).
    kv_.make_writable(skip_, T_, c_.n_layers, kvd_);
    std::vector<float> x = e_.embed(tokens_.subspan(skip_));
    e_.layer_forward(0, x.data(), skip_, T_, kv_, {});
    out_.first_layer_rows = T_ - skip_;
    select(x);
    if (out_.deviation > max_deviation_) {
      out_.estimated_error = estimate_before_head();
      return finish_exactly(1, x, result);
    }
    int refused_at = -1;
    for (int l = 1; l < c_.n_layers; ++l) {
      if (l >= 2) donor_layer(l);
      if (deep_layer(l) || refused_at >= 0) continue;
      refused_at = l;
      if (on_refusal_ == RefusedBlend::kStop) {
        out_.estimated_error = estimate_before_head();
        return finish_exactly(l, x, result);
      }
    }
    head_of_guard_rows(result);
    if (refused_at < 0 && refused(out_.estimated_error, out_.deviation, result.logits, guard_, opt_))
      refused_at = c_.n_layers;
    if (refused_at < 0) {
      kv_.length = T_;
      out_.blended = true;
      return out_;
    }
    // Refused past layer 1 and kMeasure: the blend was finished (its
    // selected rows only) so that the exact prefill that follows measures
    // what it would have served, a calibration sample at the price of the
    // layers after the refusal.
    return finish_exactly(refused_at, x, result);
  }

 private:
  // The guard refused the donor at `layer`: every row on through layers
  // 1..L-1 exactly, from the layer-0 output x (exact, and kept for this),
  // overwriting the donor's and the selected rows' K/V. What the blend
  // did past layer 0 is lost, the rest of its work is not. A blend that
  // was finished is measured against the exact guard rows.
  BlendOutcome finish_exactly(int layer, std::vector<float>& x, llama::ForwardResult& result) {
    out_.stopped_at_layer = layer;
    out_.reused = 0;
    out_.recomputed = T_ - skip_;
    for (int l = 1; l < c_.n_layers; ++l) e_.layer_forward(l, x.data(), skip_, T_, kv_, {});
    const int rows = out_.guard_logits.empty() ? 1 : guard_rows(opt_, T_ - skip_);
    e_.head(x.data() + static_cast<std::size_t>(T_ - skip_ - rows) * c_.dim, rows, result);
    if (!out_.guard_logits.empty())
      out_.refusal_sample =
          measure_sample(out_.estimated_error, out_.deviation, result.logits, out_.guard_logits, c_.vocab_size);
    keep_last_rows(result, 1, c_);
    kv_.length = T_;
    return out_;
  }

  // Stopped before the head: the most any next-token distribution makes
  // of the deviation (its entropy is at most ln vocab).
  double estimate_before_head() const { return out_.deviation * std::sqrt(std::log(double(c_.vocab_size))); }

  // The guard rows (the tail of the selected ones) through the head: their
  // logits give the estimate, the last row's go to result.
  void head_of_guard_rows(llama::ForwardResult& result) {
    const int rows = guard_rows(opt_, T_ - skip_);
    e_.head(x_.data() + (selected_.size() - rows) * c_.dim, rows, result);
    out_.estimated_error = guard_estimate(out_.deviation, result.logits, c_.vocab_size);
    out_.guard_logits = result.logits;
    keep_last_rows(result, 1, c_);
  }

  // Row i's donor K/V in layer l, K rotated to position i.
  void donor_rows(int l, int i, float* k, float* v) const {
    const int j = align_.donor_position[i];
    const KVState& donor = donors_[align_.donor[i]];
    std::memcpy(k, donor.k(l, j), sizeof(float) * kvd_);
    std::memcpy(v, donor.v(l, j), sizeof(float) * kvd_);
    if (j != i) e_.rerotate_k(k, j, i);
  }

  // Every aligned row past the skip gets the donor's K/V for layer l.
  void donor_layer(int l) {
    for (int i = skip_; i < T_; ++i)
      if (align_.donor_position[i] >= 0 && !is_selected_[i - skip_])
        donor_rows(l, i, kv_.writable_k(l, i), kv_.writable_v(l, i));
  }

  // Layer 1: project every row, rank the aligned ones by how far their
  // fresh K/V are from the donor's, keep the worst recompute_ratio of them,
  // the ones the last row attends to most, the unaligned rows, the recent
  // rows, the last row and the guard's probes.
  void select(const std::vector<float>& x) {
    const std::vector<float> query = e_.project_kv(1, x.data(), skip_, T_, kv_);
    std::vector<std::pair<double, int>> ranked;
    std::vector<float> k(kvd_), v(kvd_);
    std::vector<Deviation> dev(T_ - skip_);
    for (int i = skip_; i < T_ - 1 - opt_.recent_rows; ++i) {
      if (align_.donor_position[i] < 0) continue;
      donor_rows(1, i, k.data(), v.data());
      dev[i - skip_].add(kv_.k(1, i), k.data(), kvd_);
      dev[i - skip_].add(kv_.v(1, i), v.data(), kvd_);
      ranked.emplace_back(dev[i - skip_].diff2, i);
    }
    std::sort(ranked.begin(), ranked.end(), std::greater<>());
    is_selected_.assign(T_ - skip_, true);
    const auto keep = static_cast<std::size_t>(std::ceil(opt_.recompute_ratio * double(ranked.size())));
    std::vector<int> reused;
    for (std::size_t r = keep; r < ranked.size(); ++r) reused.push_back(ranked[r].second);
    std::sort(reused.begin(), reused.end());
    recompute_most_attended(query, reused);
    Deviation first;  // layer 1 deviation of every reused row: measured, not sampled
    for (int i : reused) {
      is_selected_[i - skip_] = false;
      first.diff2 += dev[i - skip_].diff2;
      first.norm2 += dev[i - skip_].norm2;
    }
    pick_probes(reused);
    out_.deviation = first.relative();
    for (int i = skip_; i < T_; ++i)
      if (is_selected_[i - skip_]) selected_.push_back(i);
    out_.recomputed = static_cast<int>(selected_.size());
    out_.reused = T_ - skip_ - out_.recomputed;
    x_.resize(selected_.size() * c_.dim);
    for (std::size_t s = 0; s < selected_.size(); ++s)
      std::memcpy(x_.data() + s * c_.dim, x.data() + static_cast<std::size_t>(selected_[s] - skip_) * c_.dim,
                  sizeof(float) * c_.dim);
  }

  // Drops from `reused` the attended_rows rows that the last row, by its
  // layer-1 query, attends to most, summed over heads (they are computed).
  void recompute_most_attended(const std::vector<float>& query, std::vector<int>& reused) const {
    const auto n = static_cast<std::ptrdiff_t>(std::min<std::size_t>(opt_.attended_rows, reused.size()));
    if (n == 0) return;
    const int hd = c_.head_dim(), group = c_.n_heads / c_.n_kv_heads;
    const float scale = 1.0f / std::sqrt(static_cast<float>(hd));
    std::vector<double> weight(T_ - skip_, 0.0);
    std::vector<float> score(T_);
    for (int h = 0; h < c_.n_heads; ++h) {
      const float* q = query.data() + static_cast<std::size_t>(h) * hd;
      for (int j = 0; j < T_; ++j)
        score[j] = scale * std::inner_product(q, q + hd, kv_.k(1, j) + static_cast<std::size_t>(h / group) * hd, 0.0f);
      const float max = *std::max_element(score.begin(), score.end());
      double sum = 0.0;
      for (float& s : score) sum += (s = std::exp(s - max));
      for (int j = skip_; j < T_; ++j) weight[j - skip_] += score[j] / sum;
    }
    std::vector<int> by_weight = reused;
    std::partial_sort(by_weight.begin(), by_weight.begin() + n, by_weight.end(),
                      [&](int a, int b) { return weight[a - skip_] > weight[b - skip_]; });
    std::vector<char> attended(T_ - skip_, 0);
    for (auto p = by_weight.begin(); p != by_weight.begin() + n; ++p) attended[*p - skip_] = 1;
    std::erase_if(reused, [&](int i) { return attended[i - skip_] != 0; });
  }

  // Evenly spread over the reused rows, the same ones every run.
  void pick_probes(const std::vector<int>& reused) {
    const int n = std::min<int>(opt_.probe_rows, static_cast<int>(reused.size()));
    for (int p = 0; p < n; ++p) {
      const int i = reused[(2 * p + 1) * reused.size() / (2 * n)];
      is_selected_[i - skip_] = true;
      probes_.push_back(i);
    }
  }

  // Layer l over the selected rows; the probes' fresh K/V against the
  // donor's they replace is the guard's sample for this layer. False once
  // the worst layer's deviation so far is past the guard's bound.
  bool deep_layer(int l) {
    std::vector<float> k(kvd_ * probes_.size()), v(kvd_ * probes_.size());
    for (std::size_t p = 0; p < probes_.size(); ++p) donor_rows(l, probes_[p], &k[p * kvd_], &v[p * kvd_]);
    e_.layer_forward_rows(l, x_.data(), selected_, kv_);
    if (l < 2) return true;
    Deviation sample;
    for (std::size_t p = 0; p < probes_.size(); ++p) {
      sample.add(kv_.k(l, probes_[p]), &k[p * kvd_], kvd_);
      sample.add(kv_.v(l, probes_[p]), &v[p * kvd_], kvd_);
    }
    out_.deviation = std::max(out_.deviation, sample.relative());
    return out_.deviation <= max_deviation_;
  }

  Engine& e_;
  const llama::ModelConfig& c_;
  std::span<const int> tokens_;
  std::span<const KVState> donors_;
  const TokenAlignment& align_;
  KVState& kv_;
  const BlendConfig& opt_;
  const BlendGuard guard_;
  const RefusedBlend on_refusal_;
  const double max_deviation_;
  const int T_, skip_, kvd_;
  std::vector<char> is_selected_;  // by row - skip
  std::vector<int> selected_, probes_;
  std::vector<float> x_;  // hidden states of the selected rows
  BlendOutcome out_;
};

}  // namespace

void keep_last_rows(llama::ForwardResult& result, int rows, const llama::ModelConfig& c) {
  if (rows < 0 || result.logits.size() <= static_cast<std::size_t>(rows) * c.vocab_size) return;
  result.logits.erase(result.logits.begin(), result.logits.end() - static_cast<std::ptrdiff_t>(rows) * c.vocab_size);
  result.hidden.erase(result.hidden.begin(), result.hidden.end() - static_cast<std::ptrdiff_t>(rows) * c.dim);
}

int guard_rows(const BlendConfig& config, int computed_rows) { return std::min(config.recent_rows + 1, computed_rows); }

double guard_estimate(double deviation, std::span<const float> logits, int vocab) {
  if (vocab < 1 || logits.empty() || logits.size() % static_cast<std::size_t>(vocab) != 0)
    throw std::invalid_argument("logits: must hold one or more rows of vocab logits");
  const std::size_t rows = logits.size() / static_cast<std::size_t>(vocab);
  double mean = 0.0, last = 0.0;
  for (std::size_t r = 0; r < rows; ++r) {
    last = entropy(log_softmax(logits.subspan(r * vocab, vocab)));
    mean += last / static_cast<double>(rows);
  }
  return deviation * std::sqrt(std::max(mean, last));
}

CalibrationSample measure_sample(double estimate, double deviation, std::span<const float> exact,
                                 std::span<const float> approximate, int vocab) {
  if (vocab < 1 || exact.empty() || exact.size() % static_cast<std::size_t>(vocab) != 0)
    throw std::invalid_argument("exact: must hold one or more rows of vocab logits");
  if (approximate.size() != exact.size()) throw std::invalid_argument("approximate: must hold as many rows as exact");
  const std::size_t rows = exact.size() / static_cast<std::size_t>(vocab);
  CalibrationSample sample{.estimate = estimate, .deviation = deviation};
  for (std::size_t r = 0; r < rows; ++r) {
    sample.kl = kl(log_softmax(exact.subspan(r * vocab, vocab)), log_softmax(approximate.subspan(r * vocab, vocab)));
    sample.continuation_kl += sample.kl / static_cast<double>(rows);
  }
  return sample;
}

bool near_tie(std::span<const float> logits, double estimate, double guard, const BlendConfig& config) {
  if (logits.size() < 2 || !std::isfinite(guard) || guard <= 0.0) return false;
  std::array<float, 2> top{-INFINITY, -INFINITY};
  for (float l : logits)
    if (l > top[1]) top = l > top[0] ? std::array<float, 2>{l, top[0]} : std::array<float, 2>{top[0], l};
  const double allowed_kl = config.max_kl * std::pow(estimate / guard, 2);
  return top[0] - top[1] < config.top1_sigmas * 2.0 * std::sqrt(allowed_kl);
}

bool refused(double estimate, double deviation, std::span<const float> logits, const BlendGuard& guard,
             const BlendConfig& config) {
  return estimate > std::min(config.max_error, guard.estimate) ||
         deviation > std::min(config.max_error, guard.deviation) || near_tie(logits, estimate, guard.estimate, config);
}

BlendOutcome blend_prefill(Engine& engine, std::span<const int> tokens, std::span<const KVState> donors,
                           const TokenAlignment& alignment, KVState& kv, const BlendConfig& options,
                           const BlendGuard& guard, llama::ForwardResult& result, RefusedBlend refused) {
  if (alignment.donor_position.size() != tokens.size() || alignment.donor.size() != tokens.size())
    throw std::invalid_argument("alignment: one donor position per token needed");
  for (std::size_t i = 0; i < tokens.size(); ++i)
    if (alignment.donor_position[i] >= 0 && (alignment.donor[i] < 0 || alignment.donor[i] >= std::ssize(donors) ||
                                             alignment.donor_position[i] >= donors[alignment.donor[i]].length))
      throw std::invalid_argument("alignment: token " + std::to_string(i) + " names a row no donor holds");
  if (kv.length < 0 || kv.length >= static_cast<int>(tokens.size()))
    throw std::invalid_argument("kv: must hold fewer rows than tokens");
  if (engine.config().n_layers < kMinBlendLayers)
    throw std::invalid_argument("engine: blending needs at least " + std::to_string(kMinBlendLayers) + " layers");
  if (!(options.recompute_ratio >= 0.0 && options.recompute_ratio <= 1.0))
    throw std::invalid_argument("recompute_ratio: must be in [0, 1]");
  if (options.recent_rows < 0) throw std::invalid_argument("recent_rows: must be non-negative");
  if (options.attended_rows < 0) throw std::invalid_argument("attended_rows: must be non-negative");
  if (!(guard.estimate >= 0.0 && guard.deviation >= 0.0))
    throw std::invalid_argument("guard: bounds must be non-negative");
  return Blend(engine, tokens, donors, alignment, kv, options, guard, refused).run(result);
}

}  // namespace attention_echo::serving
