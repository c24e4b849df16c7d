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

// Final norm and classifier of hidden rows [n, dim].
std::vector<float> head_logits(Engine& engine, const std::vector<float>& x) {
  if (x.empty()) return {};
  llama::ForwardResult r;
  engine.head(x.data(), static_cast<int>(x.size() / engine.config().dim), r);
  return std::move(r.logits);
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

// Row i's donor K/V in layer l, K rotated to position i.
void donor_rows(const Engine& engine, std::span<const KVState> donors, const TokenAlignment& alignment, int l, int i,
                float* k, float* v) {
  const int j = alignment.donor_position[i];
  const KVState& donor = donors[alignment.donor[i]];
  const int kvd = engine.config().kv_dim();
  std::memcpy(k, donor.k(l, j), sizeof(float) * kvd);
  std::memcpy(v, donor.v(l, j), sizeof(float) * kvd);
  if (j != i) engine.rerotate_k(k, j, i);
}

// The aligned rows in [skip, T) but the last recent_rows + 1, ranked by
// how far their layer-1 K/V in kv are from the donor's (worst first), and
// each one's deviation (by row - skip).
struct LayerOneDeviations {
  std::vector<std::pair<double, int>> ranked;  // (squared distance, row)
  std::vector<Deviation> by_row;
  // The deviation of `rows` (in [skip, T)) together.
  Deviation of(const std::vector<int>& rows, int skip) const {
    Deviation d;
    for (int i : rows) {
      d.diff2 += by_row[i - skip].diff2;
      d.norm2 += by_row[i - skip].norm2;
    }
    return d;
  }
};

LayerOneDeviations layer_one_deviations(const Engine& engine, std::span<const KVState> donors,
                                        const TokenAlignment& alignment, const KVState& kv, int skip, int T,
                                        const BlendConfig& options) {
  const int kvd = engine.config().kv_dim();
  LayerOneDeviations d;
  d.by_row.resize(T - skip);
  std::vector<float> k(kvd), v(kvd);
  for (int i = skip; i < T - 1 - options.recent_rows; ++i) {
    if (alignment.donor_position[i] < 0) continue;
    donor_rows(engine, donors, alignment, 1, i, k.data(), v.data());
    d.by_row[i - skip].add(kv.k(1, i), k.data(), kvd);
    d.by_row[i - skip].add(kv.v(1, i), v.data(), kvd);
    d.ranked.emplace_back(d.by_row[i - skip].diff2, i);
  }
  std::sort(d.ranked.begin(), d.ranked.end(), std::greater<>());
  return d;
}

// The rows of `ranked` (those to recompute first, first) past the
// recompute_ratio of them: those reused; ascending.
template <typename Rank>
std::vector<int> past_recompute_ratio(const std::vector<std::pair<Rank, int>>& ranked, const BlendConfig& options) {
  const auto keep = static_cast<std::size_t>(std::ceil(options.recompute_ratio * double(ranked.size())));
  std::vector<int> reused;
  for (std::size_t r = keep; r < ranked.size(); ++r) reused.push_back(ranked[r].second);
  std::sort(reused.begin(), reused.end());
  return reused;
}

// The aligned rows in [skip, T) but the last recent_rows + 1, less the
// recompute_ratio of them nearest the start of their run (a run that
// starts at both prompts' first token has the donor's context, exact,
// and comes last); ascending.
std::vector<int> reused_by_run_start(const TokenAlignment& alignment, int skip, int T, const BlendConfig& options) {
  std::vector<std::pair<int, int>> ranked;  // (rows since the run began, row)
  int run_start = 0;
  for (int i = 0; i < T - 1 - options.recent_rows; ++i) {
    const int j = alignment.donor_position[i];
    if (j < 0) continue;
    if (i == 0 || j == 0 || alignment.donor_position[i - 1] != j - 1 || alignment.donor[i - 1] != alignment.donor[i])
      run_start = i;
    const bool exact_context = run_start == 0 && alignment.donor_position[0] == 0;
    if (i >= skip) ranked.emplace_back(i - run_start + (exact_context ? T : 0), i);
  }
  std::stable_sort(ranked.begin(), ranked.end(), [](auto a, auto b) { return a.first < b.first; });
  return past_recompute_ratio(ranked, options);
}

// The guard's probes among `reused` (ascending): probe_rows of them, evenly
// spread, the same ones every run.
std::vector<int> spread_probes(const std::vector<int>& reused, const BlendConfig& options) {
  const int n = std::min<int>(options.probe_rows, static_cast<int>(reused.size()));
  std::vector<int> probes;
  for (int p = 0; p < n; ++p) probes.push_back(reused[(2 * p + 1) * reused.size() / (2 * n)]);
  return probes;
}

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
        selection_(resolve_selection(options.selection, alignment)),
        T_(static_cast<int>(tokens.size())),
        skip_(kv.length),
        kvd_(c_.kv_dim()) {}

  BlendOutcome run(llama::ForwardResult& result) {
    // Rows past the skip, all of this prompt's own pages (the page where
    // the stored prefix ends is copied here, if shared).
    kv_.make_writable(skip_, T_, c_.n_layers, kvd_);
    out_.selection = selection_;
    std::vector<float> x;  // layer 0's output of every row (kDeviation only)
    if (selection_ == BlendSelection::kDeviation) {
      x = e_.embed(tokens_.subspan(skip_));
      e_.layer_forward(0, x.data(), skip_, T_, kv_, {});
      out_.first_layer_rows = T_ - skip_;
      select_by_deviation(x);
      if (out_.deviation > max_deviation_) {
        out_.estimated_error = estimate_before_head();
        return finish_exactly(1, x, result);
      }
    } else {
      select_by_run_start();
    }
    // Layer 0 is done and layer 1's K/V of every reused row are in place.
    int refused_at = -1;
    for (int l = 1; l < c_.n_layers; ++l) {
      if (l >= 2) donor_layer(l);
      if (deep_layer(l) && refused_at < 0) continue;
      if (refused_at < 0) refused_at = l;
      if (on_refusal_ == RefusedBlend::kStop || !worth_measuring()) {
        out_.estimated_error = estimate_before_head();
        return finish_exactly(refused_at, x, result);
      }
    }
    head_of_guard_rows(result);
    if (refused_at < 0 && refused(out_.estimated_error, out_.deviation, result.logits, guard_, opt_)) {
      refused_at = c_.n_layers;
      out_.near_tie = near_tie(result.logits, guard_.estimate, opt_);
    }
    out_.probe_hidden = probe_hidden();
    if (refused_at < 0) {
      kv_.length = T_;
      out_.blended = true;
      return out_;
    }
    // Refused and kMeasure: the blend was finished (its selected rows only)
    // so that the exact prefill that follows measures what it would have
    // served, a calibration sample at the price of the layers after the
    // refusal.
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
    const int from = x.empty() ? 0 : 1;  // kRunStart has no layer-0 output of every row
    if (x.empty()) x = e_.embed(tokens_.subspan(skip_));
    for (int l = from; l < c_.n_layers; ++l) e_.layer_forward(l, x.data(), skip_, T_, kv_, {});
    const int rows = out_.guard_logits.empty() ? 1 : guard_rows(opt_, T_ - skip_);
    e_.head(x.data() + static_cast<std::size_t>(T_ - skip_ - rows) * c_.dim, rows, result);
    if (!out_.guard_logits.empty())
      out_.refusal_sample =
          measure_sample(out_.estimated_error, out_.deviation, result.logits, out_.guard_logits, c_.vocab_size,
                         exact_logits(x, out_.probes), head_logits(e_, out_.probe_hidden));
    if (out_.refusal_sample) out_.refusal_sample->selection = selection_;
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

  // The blend's final hidden rows at its probes (selected rows).
  std::vector<float> probe_hidden() const {
    std::vector<float> probes_x;
    for (int i : out_.probes) {
      const auto s = std::lower_bound(selected_.begin(), selected_.end(), i) - selected_.begin();
      probes_x.insert(probes_x.end(), x_.begin() + s * c_.dim, x_.begin() + (s + 1) * c_.dim);
    }
    return probes_x;
  }

  // The exact logits at `positions` from x, every row past the skip.
  std::vector<float> exact_logits(const std::vector<float>& x, const std::vector<int>& positions) {
    std::vector<float> rows;
    for (int i : positions)
      rows.insert(rows.end(), x.begin() + static_cast<std::ptrdiff_t>(i - skip_) * c_.dim,
                  x.begin() + static_cast<std::ptrdiff_t>(i - skip_ + 1) * c_.dim);
    return head_logits(e_, rows);
  }


  // Row i's donor K/V in layer l, K rotated to position i.
  void donor_rows(int l, int i, float* k, float* v) const {
    serving::donor_rows(e_, donors_, align_, l, i, k, v);
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
  void select_by_deviation(const std::vector<float>& x) {
    const std::vector<float> query = e_.project_kv(1, x.data(), skip_, T_, kv_);
    const LayerOneDeviations dev = layer_one_deviations(e_, donors_, align_, kv_, skip_, T_, opt_);
    is_selected_.assign(T_ - skip_, true);
    std::vector<int> reused = past_recompute_ratio(dev.ranked, opt_);
    recompute_most_attended(query, reused);
    out_.deviation = dev.of(reused, skip_).relative();  // every reused row's: measured, not sampled
    keep_selected(reused);
    gather(x, selected_, x_);
  }

  // Layer 0's K/V of every row (exact: a token and its position make
  // them), then the aligned rows nearest the start of their run, the
  // recompute_ratio of them, the unaligned rows, the recent rows, the last
  // row and the guard's probes through layer 0; then the rows the last row
  // attends to most in layer 1 (its query there against the donors' K it
  // will read), through layer 0 too. Layer 0 attends too locally to tell
  // them: chosen by its query they brought the next token no closer.
  void select_by_run_start() {
    const std::vector<float> embedded = e_.embed(tokens_.subspan(skip_));
    e_.project_kv(0, embedded.data(), skip_, T_, kv_);
    std::vector<int> reused = reused_by_run_start(align_, skip_, T_, opt_);
    is_selected_.assign(T_ - skip_, true);
    keep_selected(reused);
    through_first_layer(embedded, selected_, x_);
    std::erase_if(reused, [&](int i) { return is_selected_[i - skip_] != 0; });  // the probes
    add_most_attended(embedded, std::move(reused));
  }

  // Of `reused`, the rows the last row attends to most in layer 1 (its
  // query against the donors' K, which it will read) join the selected
  // rows, through layer 0. Every aligned row's layer-1 K/V are the donors'
  // from here on; the selected rows' are computed over them.
  void add_most_attended(const std::vector<float>& embedded, std::vector<int> reused) {
    for (int i = skip_; i < T_; ++i)
      if (align_.donor_position[i] >= 0) donor_rows(1, i, kv_.writable_k(1, i), kv_.writable_v(1, i));
    const std::vector<float> query =
        e_.project_kv(1, x_.data() + (selected_.size() - 1) * c_.dim, T_ - 1, T_, kv_);
    std::vector<int> attended = reused;
    recompute_most_attended(query, reused);
    std::erase_if(attended, [&](int i) { return std::binary_search(reused.begin(), reused.end(), i); });
    if (attended.empty()) return;
    std::vector<float> attended_x;
    through_first_layer(embedded, attended, attended_x);
    merge_selected(attended, attended_x);
  }

  // The hidden states of `rows` out of those of every row past the skip.
  void gather(const std::vector<float>& every_row, const std::vector<int>& rows, std::vector<float>& x) const {
    x.resize(rows.size() * c_.dim);
    for (std::size_t s = 0; s < rows.size(); ++s)
      std::memcpy(x.data() + s * c_.dim, every_row.data() + static_cast<std::size_t>(rows[s] - skip_) * c_.dim,
                  sizeof(float) * c_.dim);
  }

  // The rows (ascending) from their embeddings through layer 0, into x.
  void through_first_layer(const std::vector<float>& embedded, const std::vector<int>& rows, std::vector<float>& x) {
    gather(embedded, rows, x);
    e_.layer_forward_rows(0, x.data(), rows, kv_);
  }

  // More rows (ascending, with their hidden states) into the selected ones.
  void merge_selected(const std::vector<int>& rows, const std::vector<float>& x) {
    std::vector<int> merged;
    std::vector<float> merged_x;
    merged_x.reserve(x_.size() + x.size());
    std::size_t a = 0, b = 0;
    while (a < selected_.size() || b < rows.size()) {
      const bool from_rows = a == selected_.size() || (b < rows.size() && rows[b] < selected_[a]);
      const float* h = from_rows ? x.data() + b * c_.dim : x_.data() + a * c_.dim;
      merged.push_back(from_rows ? rows[b++] : selected_[a++]);
      merged_x.insert(merged_x.end(), h, h + c_.dim);
      is_selected_[merged.back() - skip_] = true;
    }
    selected_ = std::move(merged);
    x_ = std::move(merged_x);
    out_.recomputed = static_cast<int>(selected_.size());
    out_.reused = T_ - skip_ - out_.recomputed;
  }

  // Every row past the skip but `reused` (and the probes picked among them)
  // is selected.
  void keep_selected(const std::vector<int>& reused) {
    for (int i : reused) is_selected_[i - skip_] = false;
    pick_probes(reused);
    for (int i = skip_; i < T_; ++i)
      if (is_selected_[i - skip_]) selected_.push_back(i);
    out_.recomputed = static_cast<int>(selected_.size());
    out_.reused = T_ - skip_ - out_.recomputed;
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
      for (int j = 0; j < T_; ++j) {
        const float* k = kv_.k(1, j) + static_cast<std::size_t>(h / group) * hd;
        score[j] = has_key(j) ? scale * std::inner_product(q, q + hd, k, 0.0f) : -INFINITY;
      }
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

  // Whether row j's layer-1 K is written when the attended rows are
  // chosen: with kRunStart, the unaligned rows' are not yet.
  bool has_key(int j) const {
    return selection_ == BlendSelection::kDeviation || j < skip_ || j == T_ - 1 || align_.donor_position[j] >= 0;
  }

  void pick_probes(const std::vector<int>& reused) {
    out_.probes = spread_probes(reused, opt_);
    for (int i : out_.probes) is_selected_[i - skip_] = true;
  }

  // Whether a refused blend is still worth finishing to measure it: its
  // KL grows as the deviation squared, so one at kMeasurableReach times
  // its bound is predicted at 9 times the KL target, and a sample that far
  // off tells the guard nothing a refusal does not. Over the sweeps of
  // BENCHMARKS.md section 16 (four texts, two models, 512-4096 tokens) none
  // of the refused blends measured at 3 or more times their bound came under
  // the target, and finishing each cost a further 10-20% of an exact prefill.
  bool worth_measuring() const { return out_.deviation <= kMeasurableReach * max_deviation_; }
  static constexpr double kMeasurableReach = 3.0;

  // Layer l over the selected rows; the probes' fresh K/V against the
  // donor's they replace is the guard's sample for this layer. False once
  // the worst layer's deviation so far is past the guard's bound.
  bool deep_layer(int l) {
    const std::vector<int>& probes = out_.probes;
    std::vector<float> k(kvd_ * probes.size()), v(kvd_ * probes.size());
    for (std::size_t p = 0; p < probes.size(); ++p) donor_rows(l, probes[p], &k[p * kvd_], &v[p * kvd_]);
    e_.layer_forward_rows(l, x_.data(), selected_, kv_);
    if (l == 1 && selection_ == BlendSelection::kDeviation) return true;  // measured over every reused row
    Deviation sample;
    for (std::size_t p = 0; p < probes.size(); ++p) {
      sample.add(kv_.k(l, probes[p]), &k[p * kvd_], kvd_);
      sample.add(kv_.v(l, probes[p]), &v[p * kvd_], kvd_);
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
  const BlendSelection selection_;  // never kAuto
  const int T_, skip_, kvd_;
  std::vector<char> is_selected_;  // by row - skip
  std::vector<int> selected_;
  std::vector<float> x_;  // hidden states of the selected rows
  BlendOutcome out_;
};

}  // namespace

std::string_view to_string(BlendSelection selection) {
  switch (selection) {
    case BlendSelection::kAuto: return "auto";
    case BlendSelection::kRunStart: return "run-start";
    case BlendSelection::kDeviation: return "deviation";
  }
  return "unknown";
}

BlendSelection parse_blend_selection(std::string_view text) {
  for (BlendSelection s : {BlendSelection::kAuto, BlendSelection::kRunStart, BlendSelection::kDeviation})
    if (text == to_string(s)) return s;
  throw std::invalid_argument("blend_selection: unknown '" + std::string(text) + "' (auto, run-start, deviation)");
}

BlendSelection resolve_selection(BlendSelection selection, const TokenAlignment& alignment) {
  if (selection != BlendSelection::kAuto) return selection;
  return moves_text(alignment) ? BlendSelection::kDeviation : BlendSelection::kRunStart;
}

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

namespace {

// KL(exact || approximate) of each row, nats.
std::vector<double> row_kls(std::span<const float> exact, std::span<const float> approximate, int vocab) {
  std::vector<double> kls(exact.size() / static_cast<std::size_t>(vocab));
  for (std::size_t r = 0; r < kls.size(); ++r)
    kls[r] = kl(log_softmax(exact.subspan(r * vocab, vocab)), log_softmax(approximate.subspan(r * vocab, vocab)));
  return kls;
}

double mean(const std::vector<double>& v) {
  return v.empty() ? 0.0 : std::accumulate(v.begin(), v.end(), 0.0) / static_cast<double>(v.size());
}

}  // namespace

CalibrationSample measure_sample(double estimate, double deviation, std::span<const float> exact,
                                 std::span<const float> approximate, int vocab, std::span<const float> exact_probes,
                                 std::span<const float> approximate_probes) {
  if (vocab < 1 || exact.empty() || exact.size() % static_cast<std::size_t>(vocab) != 0)
    throw std::invalid_argument("exact: must hold one or more rows of vocab logits");
  if (approximate.size() != exact.size()) throw std::invalid_argument("approximate: must hold as many rows as exact");
  if (exact_probes.size() % static_cast<std::size_t>(vocab) != 0)
    throw std::invalid_argument("exact_probes: must hold rows of vocab logits");
  if (approximate_probes.size() != exact_probes.size())
    throw std::invalid_argument("approximate_probes: must hold as many rows as exact_probes");
  const std::vector<double> guard = row_kls(exact, approximate, vocab);
  return {.estimate = estimate,
          .kl = guard.back(),
          .deviation = deviation,
          .continuation_kl = std::max(mean(guard), mean(row_kls(exact_probes, approximate_probes, vocab)))};
}

std::vector<float> logits_at(std::span<const float> logits, std::span<const int> positions, int first, int vocab) {
  std::vector<float> rows;
  rows.reserve(positions.size() * static_cast<std::size_t>(vocab));
  for (int i : positions) {
    const auto row = logits.subspan(static_cast<std::size_t>(i - first) * vocab, vocab);
    rows.insert(rows.end(), row.begin(), row.end());
  }
  return rows;
}

bool near_tie(std::span<const float> logits, double guard, const BlendConfig& config) {
  if (logits.size() < 2 || !std::isfinite(guard) || guard <= 0.0) return false;
  std::array<float, 2> top{-INFINITY, -INFINITY};
  for (float l : logits)
    if (l > top[1]) top = l > top[0] ? std::array<float, 2>{l, top[0]} : std::array<float, 2>{top[0], l};
  return top[0] - top[1] < config.top1_sigmas * 2.0 * std::sqrt(config.max_kl);
}

bool refused(double estimate, double deviation, std::span<const float> logits, const BlendGuard& guard,
             const BlendConfig& config) {
  return estimate > std::min(config.max_error, guard.estimate) ||
         deviation > std::min(config.max_error, guard.deviation) || near_tie(logits, guard.estimate, config);
}

namespace {

void validate_alignment(const TokenAlignment& alignment, std::size_t tokens, std::span<const KVState> donors) {
  if (alignment.donor_position.size() != tokens || alignment.donor.size() != tokens)
    throw std::invalid_argument("alignment: one donor position per token needed");
  for (std::size_t i = 0; i < tokens; ++i)
    if (alignment.donor_position[i] >= 0 && (alignment.donor[i] < 0 || alignment.donor[i] >= std::ssize(donors) ||
                                             alignment.donor_position[i] >= donors[alignment.donor[i]].length))
      throw std::invalid_argument("alignment: token " + std::to_string(i) + " names a row no donor holds");
}

}  // namespace

BlendOutcome blend_prefill(Engine& engine, std::span<const int> tokens, std::span<const KVState> donors,
                           const TokenAlignment& alignment, KVState& kv, const BlendConfig& options,
                           const BlendGuard& guard, llama::ForwardResult& result, RefusedBlend refused) {
  validate_alignment(alignment, tokens.size(), donors);
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

ScreenedBlend screen_blend(const Engine& engine, std::span<const KVState> donors, const TokenAlignment& alignment,
                           int skip, const KVState& kv, std::span<const float> logits,
                           const BlendConfig& options) {
  validate_alignment(alignment, static_cast<std::size_t>(kv.length), donors);
  if (skip < 0 || skip >= kv.length) throw std::invalid_argument("skip: must be in [0, kv.length)");
  const llama::ModelConfig& c = engine.config();
  if (c.n_layers < kMinBlendLayers)
    throw std::invalid_argument("engine: blending needs at least " + std::to_string(kMinBlendLayers) + " layers");
  ScreenedBlend s;
  s.selection = resolve_selection(options.selection, alignment);
  std::vector<int> reused;
  int from = 1;
  if (s.selection == BlendSelection::kDeviation) {
    const LayerOneDeviations dev = layer_one_deviations(engine, donors, alignment, kv, skip, kv.length, options);
    reused = past_recompute_ratio(dev.ranked, options);
    s.deviation = dev.of(reused, skip).relative();
    from = 2;
  } else {
    reused = reused_by_run_start(alignment, skip, kv.length, options);
  }
  const int kvd = c.kv_dim();
  std::vector<float> k(kvd), v(kvd);
  s.probes = spread_probes(reused, options);
  for (int l = from; l < c.n_layers; ++l) {
    Deviation layer;
    for (int i : s.probes) {
      donor_rows(engine, donors, alignment, l, i, k.data(), v.data());
      layer.add(kv.k(l, i), k.data(), kvd);
      layer.add(kv.v(l, i), v.data(), kvd);
    }
    s.deviation = std::max(s.deviation, layer.relative());
  }
  s.estimate = guard_estimate(s.deviation, logits, c.vocab_size);
  return s;
}

std::vector<float> probe_logits(Engine& engine, const BlendOutcome& out) {
  return head_logits(engine, out.probe_hidden);
}

}  // namespace attention_echo::serving
