// The serving planner and the KV-blend tier on the bundled trained model
// (models/echo-llama-6m): RoPE re-rotation, the row-subset layer primitive,
// blending against a full prefill, the guard, the planner's routes,
// namespaces and bad input.
#include <gtest/gtest.h>

#include <cmath>
#include <random>
#include <string>
#include <utility>
#include <vector>

#include "attention_echo/engine.hpp"
#include "engine_fixtures.hpp"
#include "serving/blend_plan.hpp"
#include "serving/kv_blend.hpp"
#include "serving/kv_block_store.hpp"
#include "serving/token_alignment.hpp"

namespace ae = attention_echo;
namespace llama = attention_echo::llama;
namespace serving = attention_echo::serving;
using ae::testing::last_logits;
using ae::testing::max_abs_diff;

namespace {

// The calibrated bounds off: BlendConfig::max_error alone guards.
constexpr serving::BlendGuard kUnguarded{INFINITY, INFINITY};

const llama::Model& model() {
  static const llama::Model m(llama::load_weights(std::string(AE_SOURCE_DIR) + "/models/echo-llama-6m/model.bin"));
  return m;
}

// n tokens of text like the model's training data (Python), from a seeded
// mix of its lines.
std::vector<int> text_tokens(int n, std::uint64_t seed) {
  static const llama::Tokenizer tokenizer(std::string(AE_SOURCE_DIR) + "/models/echo-llama-6m/tokenizer.bin",
                                          model().config().vocab_size);
  static const char* kLines[] = {"def parse(self, source, *, strict=True):\n", "    tokens = self.tokenize(source)\n",
                                 "    if not tokens:\n", "        raise ValueError('empty input')\n",
                                 "    tree = self.build(tokens)\n", "    return tree\n\n",
                                 "class Parser:\n", "    \"\"\"Parse a configuration file.\"\"\"\n"};
  std::mt19937_64 rng(seed);
  std::string text;
  while (static_cast<int>(text.size()) < 2 * n) text += kLines[rng() % 8];
  std::vector<int> t = tokenizer.encode(text);
  t.resize(n);
  return t;
}

// Another ordinary token than t (ids 0-2 are <unk>, BOS, EOS).
int edited(int t) { return 3 + (t - 3 + 1) % (model().config().vocab_size - 3); }

constexpr serving::BlendSelection kSelections[] = {serving::BlendSelection::kRunStart,
                                                   serving::BlendSelection::kDeviation};
const char* name(serving::BlendSelection s) {
  return s == serving::BlendSelection::kRunStart ? "run start" : "deviation";
}

int argmax(const std::vector<float>& v) { return static_cast<int>(std::max_element(v.begin(), v.end()) - v.begin()); }

// base stored exactly in `planner`, its cost model taught by a measured
// forward, as a server's would be, so a test holds at any speed,
// sanitizers included.
void store_exactly(llama::Engine& engine, serving::Planner& planner, const std::vector<int>& base) {
  engine.timers() = {};
  last_logits(engine, base);
  planner.observe(static_cast<int>(base.size()), engine.timers().total_cpu_s, engine.timers().attention_cpu_s);
  serving::Plan seed = planner.plan(base);
  planner.execute(engine, base, seed);
}

// base stored exactly, then near planned, expected to blend, and executed.
std::pair<serving::Plan, std::vector<float>> store_then_blend(llama::Engine& engine, serving::Planner& planner,
                                                              const std::vector<int>& base,
                                                              const std::vector<int>& near) {
  store_exactly(engine, planner, base);
  serving::Plan plan = planner.plan(near);
  EXPECT_EQ(plan.route, serving::Plan::Route::kBlend);
  auto logits = planner.execute(engine, near, plan).logits;
  return {std::move(plan), std::move(logits)};
}

// A stored donor: its tokens' K/V in a block store, as the planner keeps it.
struct Donor {
  serving::KVBlockStore store;
  std::vector<int> tokens;
  Donor(llama::Engine& engine, std::vector<int> t)
      : store({model().config().n_layers, model().config().kv_dim()}, std::size_t{1} << 30), tokens(std::move(t)) {
    llama::KVState kv;
    engine.forward(tokens, kv, {});
    store.insert("", tokens, kv, false, 0.0);
  }
  // Its K/V as blend_prefill's only donor.
  std::vector<llama::KVState> rows() {
    const serving::KVBlockStore::Record& r = *store.similar("", tokens, 1).front().record;
    return {store.state(r.blocks, static_cast<int>(r.tokens.size()))};
  }
};

TEST(KVBlend, RerotatedKeysEqualKeysComputedAtTheNewPosition) {
  ae::ThreadPool pool(2);
  llama::Engine engine(model(), pool);
  const auto& c = model().config();
  const std::vector<int> a = text_tokens(40, 1);
  std::vector<int> b = text_tokens(25, 2);  // a after 25 other tokens
  b.insert(b.end(), a.begin(), a.end());
  llama::KVState ka, kb;
  const auto xa = engine.embed(a), xb = engine.embed(b);
  engine.project_kv(0, xa.data(), 0, static_cast<int>(a.size()), ka);  // layer-0 K: token and position only
  engine.project_kv(0, xb.data(), 0, static_cast<int>(b.size()), kb);
  const int kvd = c.kv_dim();
  double worst = 0.0;
  for (int j = 0; j < static_cast<int>(a.size()); ++j) {
    std::vector<float> forward(ka.k(0, j), ka.k(0, j) + kvd);
    std::vector<float> back(kb.k(0, j + 25), kb.k(0, j + 25) + kvd);
    engine.rerotate_k(forward.data(), j, j + 25);
    engine.rerotate_k(back.data(), j + 25, j);
    for (int d = 0; d < kvd; ++d) {
      worst = std::max(worst, double(std::fabs(forward[d] - kb.k(0, j + 25)[d])));
      worst = std::max(worst, double(std::fabs(back[d] - ka.k(0, j)[d])));
    }
  }
  EXPECT_LE(worst, 1e-5);
  std::vector<float> row(kvd);
  EXPECT_THROW(engine.rerotate_k(row.data(), 0, c.seq_len), std::invalid_argument);
}

// A 600-token donor and the request that edits its row 40 (exact prefix
// reuse keeps 40 rows), blended into fresh K/V.
struct EarlyEdit {
  ae::ThreadPool pool{2};
  llama::Engine engine{model(), pool};
  Donor donor{engine, text_tokens(600, 4)};
  std::vector<int> request = [this] {
    std::vector<int> r = donor.tokens;
    r[40] = edited(r[40]);
    return r;
  }();
  serving::TokenAlignment alignment = serving::align_tokens(request, donor.tokens);

  serving::BlendOutcome blend(const serving::BlendConfig& config, const serving::BlendGuard& guard,
                              llama::KVState& kv, llama::ForwardResult& result) {
    return serving::blend_prefill(engine, request, donor.rows(), alignment, kv, config, guard, result);
  }
};

TEST(KVBlend, RecomputeRatioOneReproducesTheFullPrefill) {
  ae::ThreadPool pool(2);
  llama::Engine engine(model(), pool);
  Donor donor(engine, text_tokens(300, 3));
  std::vector<int> request = donor.tokens;
  request[150] = edited(request[150]);
  request.insert(request.begin() + 200, {request[10], request[11]});
  const auto alignment = serving::align_tokens(request, donor.tokens);
  for (const serving::BlendSelection selection : kSelections) {
    SCOPED_TRACE(name(selection));
    llama::KVState kv;
    llama::ForwardResult result;
    const serving::BlendConfig all{
        .enabled = true, .selection = selection, .recompute_ratio = 1.0, .max_error = INFINITY};
    const auto out = serving::blend_prefill(engine, request, donor.rows(), alignment, kv, all, kUnguarded, result);
    ASSERT_TRUE(out.blended);
    EXPECT_EQ(out.reused, 0);
    EXPECT_LE(max_abs_diff(result.logits, last_logits(engine, request)), 1e-5);
  }
}

// Two donors, each holding part of the request in the request's own
// context: the first its opening 300 tokens, the second all of it (and
// more after). Merged, the opening comes from the first and the rest from
// the second, so the blend reuses every row exactly.
TEST(KVBlend, EachRowComesFromItsOwnDonor) {
  ae::ThreadPool pool(2);
  llama::Engine engine(model(), pool);
  const std::vector<int> request = text_tokens(600, 6);
  std::vector<int> first(request.begin(), request.begin() + 300), second = request;
  const std::vector<int> other = text_tokens(200, 7);
  first.insert(first.end(), other.begin(), other.end());
  second.insert(second.end(), other.begin(), other.end());
  Donor a(engine, first), b(engine, second);
  const std::vector<std::vector<serving::AlignedRun>> per_donor = {serving::align_runs(request, a.tokens),
                                                                    serving::align_runs(request, b.tokens)};
  const serving::TokenAlignment merged = serving::merge_alignments(per_donor, static_cast<int>(request.size()));
  ASSERT_EQ(merged.donor[299], 0);
  ASSERT_EQ(merged.donor[300], 1);
  std::vector<llama::KVState> donors = a.rows();
  donors.push_back(b.rows().front());
  llama::KVState kv;
  llama::ForwardResult result;
  for (const serving::BlendSelection selection : kSelections) {
    SCOPED_TRACE(name(selection));
    const serving::BlendConfig none{
        .enabled = true, .selection = selection, .recompute_ratio = 0.0, .max_error = INFINITY};
    const auto out = serving::blend_prefill(engine, request, donors, merged, kv, none, kUnguarded, result);
    ASSERT_TRUE(out.blended);
    EXPECT_GT(out.reused, 500);
    EXPECT_LE(out.deviation, 1e-5);
    EXPECT_LE(max_abs_diff(result.logits, last_logits(engine, request)), 1e-4);
    kv = {};
  }
  const serving::BlendConfig none{.enabled = true, .recompute_ratio = 0.0, .max_error = INFINITY};
  // An alignment naming a donor that is not there, or a row past a donor's end.
  serving::TokenAlignment bad = merged;
  bad.donor[400] = 2;
  EXPECT_THROW(serving::blend_prefill(engine, request, donors, bad, kv, none, kUnguarded, result),
               std::invalid_argument);
  bad = merged;
  bad.donor[400] = 0;
  bad.donor_position[400] = 550;
  EXPECT_THROW(serving::blend_prefill(engine, request, donors, bad, kv, none, kUnguarded, result),
               std::invalid_argument);
}

TEST(KVBlend, NearDuplicateBlendsWithSmallMeasuredError) {
  EarlyEdit e;
  const auto exact = last_logits(e.engine, e.request);
  for (const serving::BlendSelection selection : kSelections) {
    SCOPED_TRACE(name(selection));
    llama::KVState kv;
    llama::ForwardResult result;
    const serving::BlendConfig config{.enabled = true, .selection = selection};
    const auto out = e.blend(config, kUnguarded, kv, result);
    ASSERT_TRUE(out.blended) << "estimate " << out.estimated_error;
    EXPECT_GT(out.reused, 400);
    EXPECT_EQ(out.first_layer_rows, selection == serving::BlendSelection::kDeviation ? 600 : 0);
    EXPECT_LE(out.deviation, config.max_error);
    EXPECT_EQ(out.estimated_error, serving::guard_estimate(out.deviation, result.logits, model().config().vocab_size));
    EXPECT_LE(out.estimated_error, config.max_error);
    EXPECT_EQ(argmax(result.logits), argmax(exact));
    EXPECT_EQ(kv.length, static_cast<int>(e.request.size()));
  }
}

// A screen measures the probes a blend would, on the exact prefill's K/V;
// with neither probes nor attended rows, kDeviation's screen is its
// blend's layer-1 deviation, which both compute from exact rows.
TEST(KVBlend, AScreenReadsTheBlendsProbesOffTheExactPrefill) {
  EarlyEdit e;
  const int T = static_cast<int>(e.request.size()), V = model().config().vocab_size;
  llama::KVState exact;
  const auto full = e.engine.forward(e.request, exact, {}, T);
  for (const serving::BlendSelection selection : kSelections) {
    SCOPED_TRACE(name(selection));
    for (const int probes : {16, 0}) {
      const serving::BlendConfig config{
          .enabled = true, .selection = selection, .attended_rows = 0, .max_error = INFINITY, .probe_rows = probes};
      const auto guard_rows = std::span(full.logits).last(std::size_t(serving::guard_rows(config, T)) * V);
      const auto screened =
          serving::screen_blend(e.engine, e.donor.rows(), e.alignment, 0, exact, guard_rows, config);
      llama::KVState kv;
      llama::ForwardResult result;
      const auto out = e.blend(config, kUnguarded, kv, result);
      EXPECT_EQ(screened.selection, selection);
      EXPECT_EQ(screened.probes, out.probes);
      EXPECT_EQ(screened.estimate, serving::guard_estimate(screened.deviation, guard_rows, V));
      if (probes == 0 && selection == serving::BlendSelection::kDeviation)
        EXPECT_NEAR(screened.deviation, out.deviation, 1e-5 * out.deviation);
      else if (probes > 0)
        EXPECT_GT(screened.deviation, 0.0);
    }
  }
  // A prompt its donor holds whole reads no deviation.
  const serving::BlendConfig config{.enabled = true};
  llama::KVState donor_kv;
  const auto donor_logits = e.engine.forward(e.donor.tokens, donor_kv, {}, T);
  const auto same = serving::align_tokens(e.donor.tokens, e.donor.tokens);
  const auto rows = std::span(donor_logits.logits).last(std::size_t(serving::guard_rows(config, T)) * V);
  EXPECT_EQ(serving::screen_blend(e.engine, e.donor.rows(), same, 0, donor_kv, rows, config).deviation, 0.0);
  EXPECT_THROW(serving::screen_blend(e.engine, e.donor.rows(), same, T, donor_kv, rows, config),
               std::invalid_argument);
  const auto shorter = serving::align_tokens(std::span(e.donor.tokens).first(T - 1), e.donor.tokens);
  EXPECT_THROW(serving::screen_blend(e.engine, e.donor.rows(), shorter, 0, donor_kv, rows, config),
               std::invalid_argument);
}

// kAuto: run starts for an edited prompt, CacheBlend's deviation ranking
// (layer 0 over every row) for one whose passages moved.
TEST(KVBlend, AutoSelectionRanksByDeviationOnlyWhereTextMoved) {
  EarlyEdit e;
  using serving::BlendSelection;
  EXPECT_EQ(serving::resolve_selection(BlendSelection::kAuto, e.alignment), BlendSelection::kRunStart);
  std::vector<int> swapped(e.donor.tokens.begin() + 300, e.donor.tokens.end());
  swapped.insert(swapped.end(), e.donor.tokens.begin(), e.donor.tokens.begin() + 300);
  const auto moved = serving::align_tokens(swapped, e.donor.tokens);
  EXPECT_EQ(serving::resolve_selection(BlendSelection::kAuto, moved), BlendSelection::kDeviation);
  EXPECT_EQ(serving::resolve_selection(BlendSelection::kRunStart, moved), BlendSelection::kRunStart);
  llama::KVState kv;
  llama::ForwardResult result;
  const serving::BlendConfig config{.enabled = true, .max_error = INFINITY};
  const auto out =
      serving::blend_prefill(e.engine, swapped, e.donor.rows(), moved, kv, config, kUnguarded, result);
  EXPECT_TRUE(out.blended);
  EXPECT_EQ(out.first_layer_rows, 600);
  llama::KVState edited_kv;
  EXPECT_EQ(e.blend(config, kUnguarded, edited_kv, result).first_layer_rows, 0);
}

// Run-start selection: layer 0's K/V of every row are projected, so they
// are exact; the rows just past the edit are computed in every layer, and
// the rows before it, whose context is the donor's, are not.
TEST(KVBlend, RunStartRecomputesTheRowsNearestTheEdit) {
  EarlyEdit e;
  ASSERT_EQ(e.alignment.donor_position[41], 41);
  llama::KVState exact;
  e.engine.forward(e.request, exact, {});
  llama::KVState kv;
  llama::ForwardResult result;
  // 5% of the 598 aligned rows before the last: rows 41..70. No probes,
  // attended or recent rows to blur the picture.
  const serving::BlendConfig config{.enabled = true, .recompute_ratio = 0.05, .recent_rows = 0,
                                    .attended_rows = 0, .max_error = INFINITY, .probe_rows = 0};
  const auto out = e.blend(config, kUnguarded, kv, result);
  ASSERT_TRUE(out.blended);
  EXPECT_EQ(out.recomputed, 30 + 2);  // and the edited row and the last
  const int kvd = model().config().kv_dim(), deep = model().config().n_layers - 1;
  auto row_error = [&](int layer, int row) {
    double worst = 0.0;
    for (int d = 0; d < kvd; ++d)
      worst = std::max(worst, double(std::fabs(kv.k(layer, row)[d] - exact.k(layer, row)[d])));
    return worst;
  };
  for (int row = 0; row < 600; ++row) ASSERT_LE(row_error(0, row), 1e-4) << "row " << row;
  for (int row = 0; row < 40; ++row) ASSERT_LE(row_error(deep, row), 1e-4) << "row " << row;
  for (int row = 41; row < 71; ++row) EXPECT_LE(row_error(deep, row), 1e-3) << "row " << row;
  EXPECT_GT(row_error(deep, 71), 1e-3);  // the first row left to its donor: its context held the old token
}

// The reused rows the last row attends to most are computed, whatever their
// deviation: with nothing else recomputed, they bring the next token's
// logits closer to the exact ones.
TEST(KVBlend, TheRowsTheLastRowAttendsToMostAreRecomputed) {
  EarlyEdit e;
  const auto exact = last_logits(e.engine, e.request);
  for (const serving::BlendSelection selection : kSelections) {
    SCOPED_TRACE(name(selection));
    auto blend = [&](int attended) {
      const serving::BlendConfig config{.enabled = true, .selection = selection, .recompute_ratio = 0.0,
                                        .recent_rows = 0, .attended_rows = attended, .max_error = INFINITY,
                                        .probe_rows = 0};
      llama::KVState kv;
      llama::ForwardResult result;
      const auto out = e.blend(config, kUnguarded, kv, result);
      EXPECT_TRUE(out.blended);
      return std::make_pair(out.recomputed, max_abs_diff(result.logits, exact));
    };
    const auto [none, none_error] = blend(0);
    const auto [some, some_error] = blend(16);
    EXPECT_EQ(some, none + 16);
    EXPECT_LT(some_error, none_error);
  }
  serving::BlendConfig bad{.enabled = true, .attended_rows = -1};
  llama::KVState kv;
  llama::ForwardResult result;
  EXPECT_THROW(e.blend(bad, kUnguarded, kv, result), std::invalid_argument);
}

// A finished blend whose top two next tokens are closer than the logit
// change a guarded blend may make is computed exactly (here every blend:
// the check made absurdly wide); off, it is served.
TEST(KVBlend, NearTieAtTheHeadIsComputedExactly) {
  EarlyEdit e;
  auto blend = [&](double sigmas) {
    llama::KVState kv;
    llama::ForwardResult result;
    const serving::BlendConfig config{.enabled = true, .top1_sigmas = sigmas};
    const serving::BlendGuard guard{config.max_error, config.max_error};  // finite: a near tie is measured against it
    const auto out = e.blend(config, guard, kv, result);
    return std::make_pair(out, result.logits);
  };
  const auto [strict, logits] = blend(1e9);
  ASSERT_GT(strict.estimated_error, 0.0);
  EXPECT_FALSE(strict.blended);
  EXPECT_EQ(strict.stopped_at_layer, model().config().n_layers);
  ASSERT_TRUE(strict.refusal_sample.has_value());  // what it would have served, measured
  EXPECT_EQ(strict.refusal_sample->estimate, strict.estimated_error);
  EXPECT_GE(strict.refusal_sample->continuation_kl, 0.0);
  EXPECT_TRUE(strict.near_tie);  // counted as refused in its namespace's refusal rate
  ASSERT_FALSE(strict.probes.empty());  // measured at the probes too
  const auto& c = model().config();
  EXPECT_EQ(strict.probe_hidden.size(), strict.probes.size() * static_cast<std::size_t>(c.dim));
  EXPECT_LE(max_abs_diff(logits, last_logits(e.engine, e.request)), 1e-4);
  const auto served = blend(0.0).first;
  EXPECT_TRUE(served.blended);
  EXPECT_FALSE(served.near_tie);
  // A caller that measures a served blend takes its probes through the head.
  EXPECT_EQ(serving::probe_logits(e.engine, served).size(),
            served.probes.size() * static_cast<std::size_t>(c.vocab_size));
}

// The estimate is the deviation weighed by the next-token entropy: the
// larger of the last guard row's and the guard rows' mean.
TEST(KVBlend, TheEstimateWeighsTheDeviationByNextTokenEntropy) {
  constexpr int V = 8;
  const std::vector<float> uniform(V, 0.0f);
  std::vector<float> certain(V, -100.0f);
  certain[3] = 100.0f;
  EXPECT_NEAR(serving::guard_estimate(0.1, uniform, V), 0.1 * std::sqrt(std::log(double(V))), 1e-12);
  EXPECT_LT(serving::guard_estimate(0.1, certain, V), 1e-12);
  std::vector<float> rows = uniform;  // an uncertain row, then a certain last one: the mean counts
  rows.insert(rows.end(), certain.begin(), certain.end());
  EXPECT_NEAR(serving::guard_estimate(0.1, rows, V), 0.1 * std::sqrt(std::log(double(V)) / 2), 1e-9);
  std::vector<float> last_uncertain = certain;  // the last row's counts where it is larger
  last_uncertain.insert(last_uncertain.end(), uniform.begin(), uniform.end());
  EXPECT_NEAR(serving::guard_estimate(0.1, last_uncertain, V), 0.1 * std::sqrt(std::log(double(V))), 1e-9);
  EXPECT_THROW(serving::guard_estimate(0.1, std::vector<float>(V + 1, 0.0f), V), std::invalid_argument);
}

// A sample's next-token KL is the last row's, its continuation KL the
// larger of the means over the guard rows and over the probes.
TEST(KVBlend, ASampleMeasuresTheLastRowAndTheGuardRowsAndProbesMeans) {
  constexpr int V = 8;
  const std::vector<float> uniform(V, 0.0f);
  std::vector<float> certain(V, -100.0f);
  certain[3] = 100.0f;
  std::vector<float> exact = certain, approximate = uniform;  // row 0 off by ln V, row 1 exact
  exact.insert(exact.end(), uniform.begin(), uniform.end());
  approximate.insert(approximate.end(), uniform.begin(), uniform.end());
  const auto s = serving::measure_sample(0.1, 0.2, exact, approximate, V);
  EXPECT_EQ(s.estimate, 0.1);
  EXPECT_EQ(s.deviation, 0.2);
  EXPECT_NEAR(s.kl, 0.0, 1e-12);
  EXPECT_NEAR(s.continuation_kl, std::log(double(V)) / 2, 1e-9);
  // Probes off by more than the guard rows: the continuation's KL is theirs.
  const std::vector<float> probes_exact = certain, probes_approximate = uniform;  // one probe, off by ln V
  const auto p = serving::measure_sample(0.1, 0.2, exact, approximate, V, probes_exact, probes_approximate);
  EXPECT_NEAR(p.kl, 0.0, 1e-12);
  EXPECT_NEAR(p.continuation_kl, std::log(double(V)), 1e-9);
  EXPECT_NEAR(serving::measure_sample(0.1, 0.2, exact, approximate, V, uniform, uniform).continuation_kl,
              std::log(double(V)) / 2, 1e-9);  // probes exact: the guard rows' mean
  EXPECT_THROW(serving::measure_sample(0.1, 0.2, exact, approximate, V, probes_exact, {}), std::invalid_argument);
  EXPECT_THROW(serving::measure_sample(0.1, 0.2, exact, uniform, V), std::invalid_argument);
  EXPECT_THROW(serving::measure_sample(0.1, 0.2, std::vector<float>(V + 1), std::vector<float>(V + 1), V),
               std::invalid_argument);
}

TEST(KVBlend, UnrelatedDonorIsRefusedByTheGuardAndServedExactly) {
  ae::ThreadPool pool(2);
  llama::Engine engine(model(), pool);
  // The same 200 tokens behind 300 tokens of other text: they align, but
  // their K/V were computed in another context.
  std::vector<int> shared = text_tokens(200, 5);
  std::vector<int> donor_tokens(300), request(300);
  const std::vector<int> other = text_tokens(600, 8);
  std::copy(other.begin(), other.begin() + 300, donor_tokens.begin());
  std::copy(other.begin() + 300, other.end(), request.begin());
  donor_tokens.insert(donor_tokens.end(), shared.begin(), shared.end());
  request.insert(request.end(), shared.begin(), shared.end());
  Donor donor(engine, donor_tokens);
  const auto alignment = serving::align_tokens(request, donor.tokens);
  ASSERT_GT(alignment.aligned, 150);
  llama::KVState kv;
  llama::ForwardResult result;
  // Their K/V deviate from the exact ones by about 0.19-0.24 (relative, the
  // deep layers' probes, with and without recent rows recomputed): a guard
  // at half of that must refuse the donor.
  const auto exact = last_logits(engine, request);
  for (const serving::BlendSelection selection : kSelections) {
    SCOPED_TRACE(name(selection));
    const serving::BlendConfig guard{.enabled = true, .selection = selection, .max_error = 0.1};
    llama::KVState kv;
    llama::ForwardResult result;
    const auto out = serving::blend_prefill(engine, request, donor.rows(), alignment, kv, guard, kUnguarded, result);
    EXPECT_FALSE(out.blended);
    // Its layer-1 deviation is small: the deep layers' probes refuse it.
    EXPECT_GT(out.stopped_at_layer, 1);
    EXPECT_TRUE(out.refusal_sample.has_value());  // finished anyway, measured
    EXPECT_GT(out.deviation, guard.max_error);
    EXPECT_LE(max_abs_diff(result.logits, exact), 1e-4);
    // Told to stop where it is refused: the same layer, served the same, unmeasured.
    llama::KVState stopped_kv;
    llama::ForwardResult stopped_result;
    const auto stopped = serving::blend_prefill(engine, request, donor.rows(), alignment, stopped_kv, guard,
                                                kUnguarded, stopped_result, serving::RefusedBlend::kStop);
    EXPECT_FALSE(stopped.blended);
    EXPECT_EQ(stopped.stopped_at_layer, out.stopped_at_layer);
    EXPECT_FALSE(stopped.refusal_sample.has_value());
    EXPECT_TRUE(stopped.guard_logits.empty());
    EXPECT_LE(max_abs_diff(stopped_result.logits, exact), 1e-4);
    // Under a guard it passes three times over before it is done, it is not
    // worth measuring: stopped there, though asked to measure.
    const serving::BlendConfig tight{.enabled = true, .selection = selection, .max_error = out.deviation / 8};
    llama::KVState far_kv;
    llama::ForwardResult far_result;
    const auto far = serving::blend_prefill(engine, request, donor.rows(), alignment, far_kv, tight, kUnguarded,
                                            far_result, serving::RefusedBlend::kMeasure);
    EXPECT_FALSE(far.blended);
    EXPECT_FALSE(far.refusal_sample.has_value());
    EXPECT_TRUE(far.guard_logits.empty());
    EXPECT_GT(far.deviation, 3 * tight.max_error);
    EXPECT_LE(max_abs_diff(far_result.logits, exact), 1e-4);
  }
}

// The engine's K/V pages: their size changes no bit of the logits, and a
// prefix of a state (ending inside a page) goes on without touching the
// state it shares pages with: only the page it writes into is copied.
TEST(KVPages, PageSizeChangesNothingAndAPrefixCopiesOnlyThePageItWrites) {
  ae::ThreadPool pool(2);
  llama::Engine engine(model(), pool);
  const auto a = text_tokens(300, 21);
  llama::KVState small, large;
  large.page_tokens = 128;
  const auto logits = engine.forward(a, small, {}).logits;
  EXPECT_EQ(engine.forward(a, large, {}).logits, logits);
  EXPECT_EQ(small.pages.size(), 5u);
  EXPECT_EQ(large.pages.size(), 3u);

  const std::vector<float> page1 = small.pages[1]->data;
  llama::KVState branch = small.prefix(100);  // ends inside page 1 (rows 64-127)
  EXPECT_EQ(branch.pages.size(), 2u);
  auto b = a;
  b.resize(100);
  const auto tail = text_tokens(150, 22);
  b.insert(b.end(), tail.begin(), tail.end());
  const auto reused = engine.forward(std::span<const int>(b).subspan(100), branch, {}).logits;
  EXPECT_LE(max_abs_diff(reused, last_logits(engine, b)), 1e-4);
  EXPECT_EQ(branch.pages[0].get(), small.pages[0].get());  // read in place, shared
  EXPECT_NE(branch.pages[1].get(), small.pages[1].get());  // written: copied first
  EXPECT_EQ(small.pages[1]->data, page1);
  EXPECT_EQ(small.length, 300);

  llama::KVState bad;
  bad.page_tokens = 100;
  EXPECT_THROW(engine.forward(a, bad, {}), std::invalid_argument);
  EXPECT_TRUE(bad.pages.empty());
}

// A page pool hands a dropped page's buffer out again (zeroed, or holding
// the copied page), reserve() fills its free list, and a page that outlives
// its pool is freed with it gone.
TEST(KVPages, APoolReusesDroppedPages) {
  auto pool = std::make_shared<llama::KVPagePool>(256);
  auto page = pool->zeroed();
  page->data[7] = 3.0f;
  const float* buffer = page->data.data();
  page.reset();
  EXPECT_EQ(pool->free_pages(), 1u);
  page = pool->zeroed();
  EXPECT_EQ(page->data.data(), buffer);
  EXPECT_EQ(page->data, std::vector<float>(256, 0.0f));
  page->data[5] = 2.0f;
  const auto copied = pool->copy(*page);
  EXPECT_EQ(copied->data, page->data);
  EXPECT_THROW(pool->copy(llama::KVPage{std::vector<float>(255)}), std::invalid_argument);
  pool->reserve(4);
  EXPECT_EQ(pool->free_pages(), 4u);
  pool.reset();  // pages still held: freed when dropped, not returned
  EXPECT_EQ(copied->data[5], 2.0f);
  EXPECT_THROW(llama::KVPagePool(0), std::invalid_argument);
}

// A state takes its pages from its pool; one of another page size is
// refused before anything changes. The planner's states share its store's
// pool, and reserve_bytes fills it (within the store's budget).
TEST(KVPages, StatesTakePagesFromTheStoresPool) {
  ae::ThreadPool pool(2);
  llama::Engine engine(model(), pool);
  const auto tokens = text_tokens(150, 25);
  const llama::ModelConfig& c = model().config();
  llama::KVState kv;
  kv.pool = std::make_shared<llama::KVPagePool>(std::size_t{2} * c.n_layers * kv.page_tokens * c.kv_dim() + 1);
  EXPECT_THROW(engine.forward(tokens, kv, {}), std::invalid_argument);
  EXPECT_TRUE(kv.pages.empty());

  const std::size_t page_bytes = sizeof(float) * 2 * c.n_layers * llama::KVState::kDefaultPageTokens * c.kv_dim();
  serving::Planner planner(c, {.store_bytes = 8 * page_bytes, .reserve_bytes = 5 * page_bytes});
  serving::Plan plan = planner.plan(tokens);
  ASSERT_TRUE(plan.kv.pool);
  EXPECT_EQ(plan.kv.pool->free_pages(), 5u);
  planner.execute(engine, tokens, plan);
  EXPECT_EQ(plan.kv.pool->free_pages(), 2u);  // 150 rows: three pages, now the store's blocks
  EXPECT_THROW(serving::Planner(c, {.store_bytes = page_bytes, .reserve_bytes = 2 * page_bytes}),
               std::invalid_argument);
}

// A stored prefix reaches the engine without a copy: the plan's pages are
// the blocks the store kept, which are the pages the first prompt's forward
// wrote; the prefix ends inside a block, which only the new prompt's copy
// changes.
TEST(Planner, StoredPrefixIsHandedToTheEngineWithoutACopy) {
  ae::ThreadPool pool(2);
  llama::Engine engine(model(), pool);
  serving::Planner planner(model().config());
  const auto first_tokens = text_tokens(300, 23);
  serving::Plan first = planner.plan(first_tokens);
  planner.execute(engine, first_tokens, first);
  const std::vector<float> block3 = first.kv.pages[3]->data;

  auto next = first_tokens;
  next.resize(200);  // 3 full blocks and 8 rows of the 4th
  const auto tail = text_tokens(100, 24);
  next.insert(next.end(), tail.begin(), tail.end());
  if (next[200] == first_tokens[200]) next[200] = edited(next[200]);
  serving::Plan plan = planner.plan(next);
  ASSERT_EQ(plan.kv.length, 200);
  ASSERT_EQ(plan.kv.pages.size(), 4u);
  for (int p = 0; p < 4; ++p) EXPECT_EQ(plan.kv.pages[p].get(), first.kv.pages[p].get()) << "page " << p;
  const auto logits = planner.execute(engine, next, plan).logits;
  EXPECT_LE(max_abs_diff(logits, last_logits(engine, next)), 1e-4);
  for (int p = 0; p < 3; ++p) EXPECT_EQ(plan.kv.pages[p].get(), first.kv.pages[p].get()) << "page " << p;
  EXPECT_NE(plan.kv.pages[3].get(), first.kv.pages[3].get());
  EXPECT_EQ(first.kv.pages[3]->data, block3);  // the stored block is unchanged
  serving::Plan again = planner.plan(first_tokens);  // and still serves its prompt
  EXPECT_EQ(again.kv.length, 299);
  EXPECT_LE(max_abs_diff(planner.execute(engine, first_tokens, again).logits, last_logits(engine, first_tokens)),
            1e-4);
}

TEST(Planner, IdenticalPromptIsAPlainSkipAndNamespacesNeverMix) {
  ae::ThreadPool pool(2);
  llama::Engine engine(model(), pool);
  serving::Planner planner(model().config(), {.blend = {.enabled = true}});
  const auto prompt = text_tokens(200, 7);
  serving::Plan first = planner.plan(prompt, 0, "tenant-a");
  planner.execute(engine, prompt, first);
  serving::Plan again = planner.plan(prompt, 0, "tenant-a");
  EXPECT_EQ(again.route, serving::Plan::Route::kReuse);
  EXPECT_EQ(again.kv.length, 199);
  EXPECT_LE(max_abs_diff(planner.execute(engine, prompt, again).logits, last_logits(engine, prompt)), 1e-4);
  // Another namespace sees nothing: no stored prefix, no donor.
  serving::Plan other = planner.plan(prompt, 0, "tenant-b");
  EXPECT_EQ(other.route, serving::Plan::Route::kReuse);
  EXPECT_EQ(other.kv.length, 0);
  auto near = prompt;
  near[20] = edited(near[20]);
  EXPECT_EQ(planner.plan(near, 0, "tenant-b").route, serving::Plan::Route::kReuse);
  // A tenant's clear drops its stored K/V only.
  serving::Plan b = planner.plan(prompt, 0, "tenant-b");
  planner.execute(engine, prompt, b);
  planner.clear("tenant-a");
  EXPECT_EQ(planner.stored_prompts(), 1u);
  EXPECT_EQ(planner.plan(prompt, 0, "tenant-a").kv.length, 0);
  EXPECT_EQ(planner.plan(prompt, 0, "tenant-b").kv.length, 199);
}

// Of two stored prompts that both cover the new one, the one that ends like
// it is the donor, though the other is more alike (two tokens differ against
// eight): rows after a donor's own change near the end carry K/V made in its
// context, and the next token reads those rows most.
TEST(Planner, AmongCoveringDonorsTheOneThatEndsLikeThePromptIsTaken) {
  ae::ThreadPool pool(2);
  llama::Engine engine(model(), pool);
  serving::Planner planner(model().config(), {.blend = {.enabled = true}});
  const auto prompt = text_tokens(1000, 29);
  const int T = static_cast<int>(prompt.size());
  auto changed_near_end = prompt;  // and at 10, so neither donor is a stored prefix past 20
  for (int i : {10, T - 200}) changed_near_end[i] = edited(changed_near_end[i]);
  auto shifted = prompt;  // 8 tokens inserted at 20: its rows past them sit 8 positions later
  const auto inserted = text_tokens(8, 30);
  shifted.insert(shifted.begin() + 20, inserted.begin(), inserted.end());
  for (const auto* donor : {&changed_near_end, &shifted}) {
    serving::Plan stored = planner.plan(*donor);
    planner.execute(engine, *donor, stored);
  }
  const serving::Plan plan = planner.plan(prompt);
  ASSERT_EQ(plan.route, serving::Plan::Route::kBlend);
  EXPECT_EQ(plan.blend->alignment.donor_position[T - 50], T - 50 + 8);
}

// The first blend calibrates the guard: it is also computed exactly, served
// exactly, and its measured KL is reported; later blends are served blended.
TEST(Planner, FirstBlendCalibratesTheGuardAndIsServedExactly) {
  ae::ThreadPool pool(2);
  llama::Engine engine(model(), pool);
  serving::Planner planner(model().config(), {.blend = {.enabled = true}});
  const auto base = text_tokens(600, 9);
  store_exactly(engine, planner, base);
  for (int round = 0; round < 2; ++round) {
    auto near = base;
    near[50 + round] = edited(near[50 + round]);
    serving::Plan plan = planner.plan(near);
    ASSERT_EQ(plan.route, serving::Plan::Route::kBlend);
    const auto logits = planner.execute(engine, near, plan).logits;
    const auto exact = last_logits(engine, near);
    EXPECT_EQ(plan.report.blend_calibration, round == 0);
    EXPECT_FALSE(plan.report.blend_rejected);
    // Served: under the bounds it was held to, which it reports.
    EXPECT_EQ(plan.report.blend_refused_at_layer, -1);
    EXPECT_GT(plan.report.blend_deviation, 0.0);
    EXPECT_LE(plan.report.blend_deviation, plan.report.blend_bounds.deviation);
    EXPECT_LE(plan.report.estimated_error, plan.report.blend_bounds.estimate);
    EXPECT_LE(plan.report.blend_bounds.deviation, 0.2);  // max_error's default
    if (round == 0) {
      EXPECT_LE(max_abs_diff(logits, exact), 1e-4);  // served exact
      EXPECT_GE(plan.report.calibration_kl, 0.0);
    }
    EXPECT_EQ(argmax(logits), argmax(exact));
  }
}

// Calibrated before serving: the samples are measured (estimate and KL of
// a blend against the exact prefill), so is what a blend costs next to its
// rows, nothing is stored, and the first blend served is an ordinary one.
TEST(Planner, CalibrationBeforeServingSparesTheFirstBlend) {
  ae::ThreadPool pool(2);
  llama::Engine engine(model(), pool);
  const auto calibration = std::make_shared<serving::BlendCalibration>();
  serving::Planner planner(model().config(), {.blend = {.enabled = true}, .calibration = calibration});
  const std::vector<std::vector<int>> passages = {text_tokens(20, 3), text_tokens(100, 4), text_tokens(100, 5),
                                                  text_tokens(100, 6)};
  EXPECT_EQ(calibration->blend_cost_factor(), 1.0);  // nothing measured
  const auto samples = planner.calibrate(engine, passages);
  ASSERT_EQ(samples.size(), 3u);
  const double factor = calibration->blend_cost_factor();
  EXPECT_NE(factor, 1.0);  // measured: a mean of timed ratios, clamped to [0.5, 4]
  EXPECT_GE(factor, 0.5);
  EXPECT_LE(factor, 4.0);
  EXPECT_EQ(serving::BlendCalibration(*calibration).blend_cost_factor(), factor);
  EXPECT_THROW(calibration->set_blend_cost_factor(0.0), std::invalid_argument);
  EXPECT_THROW(calibration->set_blend_cost_factor(NAN), std::invalid_argument);
  EXPECT_EQ(calibration->blend_cost_factor(), factor);
  for (const auto& s : samples) {
    EXPECT_GT(s.estimate, 0.0);
    EXPECT_GE(s.kl, 0.0);
  }
  // Moved passages, an edit, an insertion: pooled by the rows they recompute.
  EXPECT_EQ(samples[0].selection, serving::BlendSelection::kDeviation);
  EXPECT_EQ(samples[1].selection, serving::BlendSelection::kRunStart);
  EXPECT_EQ(samples[2].selection, serving::BlendSelection::kRunStart);
  EXPECT_EQ(planner.stored_prompts(), 0u);
  const auto base = text_tokens(600, 9);
  store_exactly(engine, planner, base);
  auto near = base;
  near[50] = edited(near[50]);
  serving::Plan plan = planner.plan(near);
  ASSERT_EQ(plan.route, serving::Plan::Route::kBlend);
  planner.execute(engine, near, plan);
  EXPECT_FALSE(plan.report.blend_calibration);
  EXPECT_THROW(planner.calibrate(engine, std::span(passages).first(2)), std::invalid_argument);
  const std::vector<std::vector<int>> short_text = {text_tokens(20, 3), text_tokens(60, 4), text_tokens(20, 5)};
  EXPECT_THROW(planner.calibrate(engine, short_text), std::invalid_argument);
  serving::Planner off(model().config());
  EXPECT_THROW(off.calibrate(engine, passages), std::invalid_argument);
}

// A sample of the next-token error alone (its continuation quiet).
serving::CalibrationSample next_token(double estimate, double kl,
                                      serving::BlendSelection selection = serving::BlendSelection::kRunStart) {
  return {.estimate = estimate, .kl = kl, .deviation = 0.0, .continuation_kl = 0.0, .selection = selection};
}

// The guard is where the samples' mean KL meets the target,
// sqrt(target * sum estimate^2 / sum KL), not the loudest sample's bound:
// per-sample KL is too noisy for one sample to set it.
TEST(BlendCalibration, SamplesArePooled) {
  const serving::BlendConfig config{.enabled = true, .max_error = 0.2, .max_kl = 1e-3};
  serving::BlendCalibration calibration;
  EXPECT_EQ(calibration.threshold({}, config).estimate, 0.2);
  calibration.add(next_token(0.1, 1e-2), config);  // alone: 0.1 * sqrt(1e-3 / 1e-2)
  EXPECT_NEAR(calibration.threshold({}, config).estimate, 0.1 * std::sqrt(0.1), 1e-12);
  calibration.add(next_token(0.1, 1e-4), config);
  EXPECT_NEAR(calibration.threshold({}, config).estimate, std::sqrt(1e-3 * 0.02 / 1.01e-2), 1e-12);
  EXPECT_EQ(calibration.samples(), 2);
}

// Moved text deviates otherwise than text in place: each selection's
// samples are pooled apart and the tighter pool bounds.
TEST(BlendCalibration, EachSelectionIsPooledApart) {
  const serving::BlendConfig config{.enabled = true, .max_error = 0.2, .max_kl = 1e-3};
  serving::BlendCalibration calibration;
  calibration.add(next_token(0.1, 1e-3), config);  // bound 0.1
  calibration.add(next_token(0.05, 1e-2, serving::BlendSelection::kDeviation), config);
  // 0.05 * sqrt(0.1), where one pool of both would allow 0.034.
  EXPECT_NEAR(calibration.threshold({}, config).estimate, 0.05 * std::sqrt(0.1), 1e-12);
}

// A sample that no blend could have measured is refused, and nothing of it
// is kept.
TEST(BlendCalibration, BadSamplesAreRefusedAndChangeNothing) {
  const serving::BlendConfig config{.enabled = true, .max_error = 0.2, .max_kl = 1e-3};
  serving::BlendCalibration calibration;
  calibration.add("rag", next_token(0.1, 1e-2), config);
  const double bound = calibration.threshold("rag", config).estimate;
  auto expect_refused = [&](const serving::CalibrationSample& bad, const std::string& argument) {
    for (const std::string_view ns : {std::string_view{}, std::string_view{"rag"}}) {
      try {
        ns.empty() ? calibration.add(bad, config) : calibration.add(ns, bad, config);
        ADD_FAILURE() << "accepted a sample with a bad " << argument;
      } catch (const std::invalid_argument& e) {
        EXPECT_NE(std::string(e.what()).find(argument), std::string::npos) << e.what();
      }
    }
  };
  expect_refused(next_token(0.1, -1e-3), "sample.kl");
  expect_refused(next_token(NAN, 1e-3), "sample.estimate");
  expect_refused({.estimate = 0.1, .kl = 1e-3, .deviation = INFINITY}, "sample.deviation");
  expect_refused({.estimate = 0.1, .kl = 1e-3, .continuation_kl = -1.0}, "sample.continuation_kl");
  expect_refused(next_token(0.1, 1e-3, serving::BlendSelection::kAuto), "sample.selection");
  EXPECT_EQ(calibration.samples(), 1);
  EXPECT_EQ(calibration.samples("rag"), 1u);
  EXPECT_EQ(calibration.threshold("rag", config).estimate, bound);
}

// A quiet sample vouches for ten times its estimate, no more.
TEST(BlendCalibration, AQuietSampleBoundsAtTenTimesItsEstimate) {
  const serving::BlendConfig config{.enabled = true, .max_error = 0.2, .max_kl = 1e-3};
  serving::BlendCalibration calibration;
  calibration.add(next_token(0.005, 0.0), config);
  EXPECT_NEAR(calibration.threshold({}, config).estimate, 0.05, 1e-12);
}

// A quiet sample says only that its bound lies above its floor: a
// selection with quiet samples alone never bounds tighter than another's
// loud one, and binds only without one.
TEST(BlendCalibration, AQuietPoolNeverBoundsTighterThanALoudOne) {
  const serving::BlendConfig config{.enabled = true, .max_error = 0.2, .max_kl = 1e-3};
  serving::BlendCalibration calibration;
  calibration.add(next_token(0.001, 0.0), config);  // quiet: floor 0.01
  EXPECT_NEAR(calibration.threshold({}, config).estimate, 0.01, 1e-12);
  calibration.add(next_token(0.1, 1e-2, serving::BlendSelection::kDeviation), config);  // loud: 0.1 * sqrt(0.1)
  EXPECT_NEAR(calibration.threshold({}, config).estimate, 0.1 * std::sqrt(0.1), 1e-12);
  calibration.add(next_token(0.02, 4e-3), config);  // the quiet pool turns loud: sqrt(1e-3 * 4.01e-4 / 4.01e-3)
  EXPECT_NEAR(calibration.threshold({}, config).estimate, 0.01, 1e-12);
}

// The two bounds are calibrated apart, each on the error it predicts: a
// blend whose next token was safe but whose guard rows were not bounds the
// deviation, not the estimate.
TEST(BlendCalibration, TheDeviationIsBoundedByTheGuardRowsError) {
  const serving::BlendConfig config{.enabled = true, .max_error = 0.2, .max_kl = 1e-3, .max_continuation_kl = 1e-3};
  serving::BlendCalibration calibration;
  calibration.add({.estimate = 0.01, .kl = 1e-7, .deviation = 0.15, .continuation_kl = 1e-1}, config);
  const serving::BlendGuard guard = calibration.threshold({}, config);
  EXPECT_NEAR(guard.estimate, 0.1, 1e-12);     // quiet: ten times the estimate
  EXPECT_NEAR(guard.deviation, 0.015, 1e-12);  // 0.15 * sqrt(1e-3 / 1e-1)
}

// A namespace is guarded by the model's samples until it has its own, then
// by its own: one application's quiet blends are not refused for another
// prompt shape's loud one, and a loud namespace stays strict.
TEST(BlendCalibration, ANamespaceIsGuardedByItsOwnSamplesOnceItHasThem) {
  const serving::BlendConfig config{.enabled = true, .max_error = 0.2, .max_kl = 1e-3};
  serving::BlendCalibration calibration;
  calibration.add(next_token(0.1, 1e-1), config);  // the model's: bound 0.01
  EXPECT_NEAR(calibration.threshold("rag", config).estimate, 0.01, 1e-12);
  calibration.add("rag", next_token(0.08, 1e-7), config);  // quiet: bound 0.8
  EXPECT_EQ(calibration.threshold("rag", config).estimate, 0.2);
  calibration.add("code", next_token(0.05, 4e-3), config);  // alone: 0.025
  calibration.add("code", next_token(0.02, 1e-6), config);
  EXPECT_NEAR(calibration.threshold("code", config).estimate, std::sqrt(1e-3 * 2.9e-3 / 4.01e-3), 1e-12);
  // No samples: the model's, all four pooled.
  EXPECT_NEAR(calibration.threshold("chat", config).estimate, std::sqrt(1e-3 * 0.0193 / 0.10402), 1e-12);
  EXPECT_EQ(calibration.samples(), 4);
}

// The refusal rate the planner prices blends at is that of the namespace's
// recent blends under its guard now, either bound: it falls when the guard
// is loosened.
TEST(BlendCalibration, RefusalRateFollowsTheCurrentGuard) {
  const serving::BlendConfig config{.enabled = true, .max_error = 0.2, .max_kl = 1e-3};
  serving::BlendCalibration calibration;
  EXPECT_EQ(calibration.refusal_rate("rag", config), 0.5);  // nothing known
  calibration.add(next_token(0.1, 1e-1), config);           // guard 0.01
  for (int i = 0; i < 4; ++i) calibration.record_blend("rag", 0.08, 0.0);
  EXPECT_NEAR(calibration.refusal_rate("rag", config), 5.0 / 6.0, 1e-12);
  calibration.add("rag", next_token(0.08, 1e-7), config);  // guard 0.2
  EXPECT_NEAR(calibration.refusal_rate("rag", config), 1.0 / 6.0, 1e-12);
  calibration.record_blend("rag", 0.0, 0.3);  // past the deviation bound
  EXPECT_NEAR(calibration.refusal_rate("rag", config), 2.0 / 7.0, 1e-12);
  calibration.record_blend("rag", 0.0, 0.0, true);  // under both bounds, refused for a near tie
  EXPECT_NEAR(calibration.refusal_rate("rag", config), 3.0 / 8.0, 1e-12);
  // A new namespace: rag's first verdict, refused under the guard it had,
  // passes under rag's guard now.
  EXPECT_NEAR(calibration.refusal_rate("code", config), 1.0 / 3.0, 1e-12);
}

// A namespace whose blends were refused is not given up for good: after
// calibrate_every prompts in a row denied a blend by the refusal rate, one
// is priced as if it would pass; a blend resets the count.
TEST(BlendCalibration, ANamespacePricedOutOfBlendingTriesAgain) {
  const serving::BlendConfig config{.enabled = true, .max_error = 0.2, .max_kl = 1e-3, .calibrate_every = 4};
  serving::BlendCalibration calibration;
  for (int i = 0; i < 2; ++i) calibration.record_blend("rag", 0.3, 0.0);  // past max_error
  EXPECT_NEAR(calibration.refusal_rate("rag", config), 0.75, 1e-12);
  for (int i = 0; i < 3; ++i) calibration.priced_out("rag");
  EXPECT_NEAR(calibration.refusal_rate("rag", config), 0.75, 1e-12);
  calibration.priced_out("rag");
  EXPECT_EQ(calibration.refusal_rate("rag", config), 0.0);
  EXPECT_NEAR(calibration.refusal_rate("code", config), 2.0 / 3.0, 1e-12);  // rag's first verdict, refused
  calibration.record_screen("rag", 0.3, 0.0);  // a screen is not a try
  EXPECT_EQ(calibration.refusal_rate("rag", config), 0.0);
  calibration.record_blend("rag", 0.3, 0.0);  // tried, and refused again
  EXPECT_NEAR(calibration.refusal_rate("rag", config), 5.0 / 6.0, 1e-12);
  serving::BlendConfig never = config;
  never.calibrate_every = 0;
  for (int i = 0; i < 8; ++i) calibration.priced_out("rag");
  EXPECT_NEAR(calibration.refusal_rate("rag", never), 5.0 / 6.0, 1e-12);
}

// A namespace with no blend or screen of its own is priced at the odds of
// the model's namespaces' first verdicts (each under its namespace's
// guard now); its own, screened or tried, take over from its first.
TEST(BlendCalibration, ANewNamespaceIsPricedAtTheModelsFirstVerdicts) {
  const serving::BlendConfig config{.enabled = true, .max_error = 0.2, .max_kl = 1e-3};
  serving::BlendCalibration calibration;
  EXPECT_NEAR(calibration.refusal_rate("rag", config), 0.5, 1e-12);
  calibration.priced_out("rag");  // a namespace with no verdict yet
  EXPECT_NEAR(calibration.refusal_rate("rag", config), 0.5, 1e-12);
  calibration.record_blend("rag", 0.3, 0.0);  // past max_error
  calibration.record_blend("rag", 0.01, 0.0);  // a later verdict: not the model's
  EXPECT_NEAR(calibration.refusal_rate("code", config), 2.0 / 3.0, 1e-12);
  calibration.record_screen("code", 0.01, 0.0);
  EXPECT_NEAR(calibration.refusal_rate("code", config), 1.0 / 3.0, 1e-12);
  EXPECT_NEAR(calibration.refusal_rate("chat", config), 2.0 / 4.0, 1e-12);
  calibration.record_screen("near-dup", 0.01, 0.0, /*near_tie=*/true);
  EXPECT_NEAR(calibration.refusal_rate("chat", config), 3.0 / 5.0, 1e-12);
  const serving::BlendCalibration copy(calibration);  // the first verdicts go with it
  EXPECT_NEAR(copy.refusal_rate("chat", config), 3.0 / 5.0, 1e-12);
}

// Moved text and text in place are priced apart: a namespace whose first
// blend would move passages is priced at the first verdicts of such blends.
TEST(BlendCalibration, FirstVerdictsArePricedBySelection) {
  using serving::BlendSelection;
  const serving::BlendConfig config{.enabled = true, .max_error = 0.2, .max_kl = 1e-3};
  serving::BlendCalibration calibration;
  calibration.record_blend("rag", 0.3, 0.0, false, BlendSelection::kDeviation);  // refused
  calibration.record_screen("code", 0.01, 0.0, false, BlendSelection::kRunStart);
  EXPECT_NEAR(calibration.refusal_rate("rag-shuffled", config, BlendSelection::kDeviation), 2.0 / 3.0, 1e-12);
  EXPECT_NEAR(calibration.refusal_rate("chat-edit", config, BlendSelection::kRunStart), 1.0 / 3.0, 1e-12);
  EXPECT_NEAR(calibration.refusal_rate("rag", config, BlendSelection::kRunStart), 2.0 / 3.0, 1e-12);  // its own
}

// The planner counts the prompts the refusal rate denied a blend, and
// tries one again after calibrate_every of them.
TEST(Planner, APlannerThatStoppedBlendingTriesAgain) {
  ae::ThreadPool pool(2);
  llama::Engine engine(model(), pool);
  constexpr int kEvery = 3;
  serving::Planner planner(model().config(), {.blend = {.enabled = true, .max_error = 1e-9, .calibrate_every = kEvery}});
  const auto base = text_tokens(600, 9);
  auto near = base;
  near[50] = edited(near[50]);
  auto first = store_then_blend(engine, planner, base, near).first;
  ASSERT_TRUE(first.report.blend_rejected);  // every blend is past max_error
  int denied = 0;
  for (int i = 1; i < 20 && denied < kEvery; ++i) {
    auto prompt = base;
    prompt[50 + i] = edited(prompt[50 + i]);
    serving::Plan plan = planner.plan(prompt);
    denied = plan.route == serving::Plan::Route::kBlend ? 0 : denied + 1;
    planner.execute(engine, prompt, plan);
    // Denied, it was screened, read past max_error; that is not a try.
    EXPECT_EQ(plan.report.blend_screened, plan.route != serving::Plan::Route::kBlend);
    if (plan.report.blend_screened) EXPECT_TRUE(plan.report.screened_refused);
  }
  ASSERT_EQ(denied, kEvery);
  auto prompt = base;
  prompt[300] = edited(prompt[300]);
  EXPECT_EQ(planner.plan(prompt).route, serving::Plan::Route::kBlend);
}

// Where the model's namespaces' first blends were refused, a new
// namespace's first blend is priced out and screened; a screen the guard
// passes brings its next blend in.
TEST(Planner, AFirstBlendPricedOutIsScreenedAndAPassingScreenBringsTheNext) {
  ae::ThreadPool pool(2);
  llama::Engine engine(model(), pool);
  auto calibration = std::make_shared<serving::BlendCalibration>();
  for (const char* other : {"a", "b", "c", "d"}) calibration->record_blend(other, 1e9, 1e9);  // refusal odds 5/6
  const serving::BlendConfig blend{.enabled = true, .max_error = 1.0};
  serving::Planner planner(model().config(), {.blend = blend, .calibration = calibration});
  const auto base = text_tokens(600, 9);
  store_exactly(engine, planner, base);
  auto near = base;
  near[50] = edited(near[50]);
  serving::Plan screened = planner.plan(near);
  ASSERT_EQ(screened.route, serving::Plan::Route::kReuse);
  const auto exact = planner.execute(engine, near, screened).logits;
  EXPECT_EQ(exact, last_logits(engine, near));  // served exactly
  ASSERT_TRUE(screened.report.blend_screened);
  EXPECT_FALSE(screened.report.screened_refused);
  EXPECT_GT(screened.report.screened_deviation, 0.0);
  EXPECT_NEAR(calibration->refusal_rate("", blend), 1.0 / 3.0, 1e-12);
  auto next = base;
  next[300] = edited(next[300]);
  EXPECT_EQ(planner.plan(next).route, serving::Plan::Route::kBlend);
}

// A blend the guard refuses past layer 1 is measured while its namespace
// has no sample of its own: its KL against the exact prefill it was
// replaced by is reported and calibrates the guard.
TEST(Planner, ARefusedBlendIsMeasuredAndCalibrates) {
  ae::ThreadPool pool(2);
  llama::Engine engine(model(), pool);
  const auto base = text_tokens(600, 9);
  auto near = base;
  near[50] = edited(near[50]);
  // The blend's estimate and deviation (worst layer) when served, then a
  // guard at 0.6 of the larger: layer 1 (measured over every reused row)
  // stays under it, a deeper layer's probes do not, and not three times
  // over (a blend that far off is not worth measuring).
  auto blend_once = [&](serving::Planner& planner) {
    auto [plan, logits] = store_then_blend(engine, planner, base, near);
    return std::make_pair(plan.report, logits);
  };
  serving::Planner served(model().config(), {.blend = {.enabled = true, .calibrate_every = 0}});
  const auto served_report = blend_once(served).first;
  const double bound = 0.6 * std::max(served_report.estimated_error, served_report.blend_deviation);
  ASSERT_GT(bound, 0.0);
  auto calibration = std::make_shared<serving::BlendCalibration>();
  serving::Planner guarded(model().config(),
                           {.blend = {.enabled = true, .max_error = bound, .calibrate_every = 0},
                            .calibration = calibration});
  const auto [report, logits] = blend_once(guarded);
  ASSERT_TRUE(report.blend_rejected);
  // Where, and by how much: past a bound of at most max_error.
  EXPECT_GE(report.blend_refused_at_layer, 2);
  EXPECT_LE(report.blend_refused_at_layer, model().config().n_layers);
  EXPECT_LE(report.blend_bounds.estimate, bound);
  EXPECT_LE(report.blend_bounds.deviation, bound);
  EXPECT_TRUE(report.blend_deviation > report.blend_bounds.deviation ||
              report.estimated_error > report.blend_bounds.estimate);
  EXPECT_LE(max_abs_diff(logits, last_logits(engine, near)), 1e-4);  // served exactly
  EXPECT_EQ(calibration->samples(), 1);
  EXPECT_EQ(calibration->samples(""), 1u);
  EXPECT_GT(report.calibration_kl, 0.0);
  // The namespace has a sample now: its next refused blend stops where it
  // is refused, served exactly and not measured.
  auto next = base;
  for (int i = 40; i < 80; ++i) next[i] = edited(next[i]);  // deviates past the bound, not three times
  serving::Plan plan = guarded.plan(next);
  ASSERT_EQ(plan.route, serving::Plan::Route::kBlend);
  const auto next_logits = guarded.execute(engine, next, plan).logits;
  ASSERT_TRUE(plan.report.blend_rejected);
  EXPECT_LE(max_abs_diff(next_logits, last_logits(engine, next)), 1e-4);
  EXPECT_EQ(plan.report.calibration_kl, 0.0);
  EXPECT_EQ(calibration->samples(), 1);
}

// A blend's K/V reused as a prefix is held to the blend's rules: the rows
// just before the prompt's last are computed, the namespace's guard now
// must pass the blend's deviation under this prompt's guard rows, and a
// near tie at the head is computed again from the exact prefix, and
// measured.
// And it is taken only where it saves a blend's worth of rows.
TEST(Planner, ABlendReusedAsAPrefixIsHeldToTheBlendsRules) {
  ae::ThreadPool pool(2);
  llama::Engine engine(model(), pool);
  const auto base = text_tokens(600, 9);
  auto near = base;
  near[50] = edited(near[50]);
  auto again = near;
  again.back() = edited(again.back());  // all of the blend but its last token
  const int T = static_cast<int>(again.size()), recent = serving::BlendConfig{}.recent_rows;
  const auto exact_logits = last_logits(engine, again);
  const serving::BlendConfig config{.enabled = true};
  // A planner holding base exactly and near blended; the guard unbounded
  // until a sample comes, so the blend is served, near tie or not.
  struct Blended {
    serving::Planner planner;
    std::shared_ptr<serving::BlendCalibration> calibration;
    double estimate;
  };
  auto blended = [&](double top1_sigmas) {
    auto calibration = std::make_shared<serving::BlendCalibration>();
    serving::Planner planner(model().config(), {.blend = {.enabled = true, .max_error = INFINITY,
                                                          .top1_sigmas = top1_sigmas, .calibrate_every = 0},
                                                .calibration = calibration});
    const serving::Plan plan = store_then_blend(engine, planner, base, near).first;
    EXPECT_TRUE(!plan.report.blend_rejected && !plan.report.blend_calibration);
    return Blended{std::move(planner), calibration, plan.report.estimated_error};
  };
  // Measured again from the exact prefix, served exact, a sample.
  auto expect_recomputed = [&](Blended& b, long long samples_before) {
    serving::Plan plan = b.planner.plan(again);
    ASSERT_FALSE(plan.reused_exact);
    const auto logits = b.planner.execute(engine, again, plan).logits;
    EXPECT_TRUE(plan.report.reused_exact);
    EXPECT_TRUE(plan.report.blend_calibration);
    EXPECT_EQ(plan.report.reused, 50);
    EXPECT_LE(max_abs_diff(logits, exact_logits), 1e-4);
    EXPECT_EQ(b.calibration->samples(), samples_before + 1);
  };
  {
    Blended b = blended(0.0);
    ASSERT_GT(b.estimate, 0.0);
    serving::Plan plan = b.planner.plan(again);
    EXPECT_EQ(plan.route, serving::Plan::Route::kReuse);
    b.planner.execute(engine, again, plan);
    EXPECT_FALSE(plan.report.reused_exact);
    EXPECT_FALSE(plan.report.blend_calibration);
    EXPECT_EQ(plan.report.reused, T - 1 - recent);
    EXPECT_GT(plan.report.estimated_error, 0.0);  // the blend's deviation under this prompt's guard rows
    auto partial = std::vector<int>(near.begin(), near.begin() + 150);  // 100 blended rows past the exact 50
    const auto tail = text_tokens(100, 77);  // too short to blend past the blended rows
    partial.insert(partial.end(), tail.begin(), tail.end());
    EXPECT_EQ(b.planner.plan(partial).kv.length, 50);  // too few to give up being a donor for
    // A sample loud on the next token: the estimate's bound falls under it.
    b.calibration->add("", {.estimate = b.estimate, .kl = 1.0, .deviation = 1.0, .continuation_kl = 0.0}, config);
    expect_recomputed(b, 1);
  }
  Blended b = blended(1e9);
  // Both bounds at 1.0: reuse allowed.
  b.calibration->add("", {.estimate = 1.0, .kl = config.max_kl, .deviation = 1.0, .continuation_kl = config.max_kl},
                     config);
  expect_recomputed(b, 1);  // a near tie at any gap
}

TEST(Planner, BadInputThrowsAndStoresNothing) {
  ae::ThreadPool pool(2);
  llama::Engine engine(model(), pool);
  serving::Planner planner(model().config(), {.blend = {.enabled = true}});
  const auto& c = model().config();
  auto expect_rejected = [&](const std::vector<int>& tokens, int prefix, const char* name) {
    try {
      planner.plan(tokens, prefix);
      ADD_FAILURE() << "no exception for " << name;
    } catch (const std::invalid_argument& e) {
      EXPECT_EQ(std::string(e.what()).rfind(name, 0), 0u) << e.what();
    }
  };
  expect_rejected({}, 0, "tokens");
  expect_rejected({1, 2, c.vocab_size}, 0, "tokens");
  expect_rejected({1, -1, 3}, 0, "tokens");
  expect_rejected(std::vector<int>(c.seq_len + 1, 5), 0, "tokens");
  expect_rejected({1, 2, 3}, 3, "prefix_length");
  EXPECT_EQ(planner.stored_prompts(), 0u);
  for (int block_tokens : {0, 100}) {
    try {
      serving::Planner bad(c, {.block_tokens = block_tokens});
      ADD_FAILURE() << "block_tokens " << block_tokens << " accepted";
    } catch (const std::invalid_argument& e) {
      EXPECT_EQ(std::string(e.what()).rfind("block_tokens", 0), 0u) << e.what();
    }
  }
  EXPECT_THROW(serving::Planner(c, {.blend = {.recompute_ratio = 1.5}}), std::invalid_argument);
  EXPECT_THROW(serving::Planner(c, {.blend = {.attended_rows = -1}}), std::invalid_argument);
  EXPECT_THROW(serving::Planner(c, {.blend = {.max_kl = 0.0}}), std::invalid_argument);
  EXPECT_THROW(serving::Planner(c, {.blend = {.top1_sigmas = -1.0}}), std::invalid_argument);
}

}  // namespace
