// The planner's K/V blocks in the shared L2 store, on a real redis-server
// and the bundled trained model: a second planner (another replica) reuses
// what the first computed, models and namespaces never share blocks, a bad
// block is rejected and ends the run read, a down server changes nothing
// but speed.
#include <gtest/gtest.h>

#include <random>
#include <string>
#include <vector>

#include "attention_echo/engine.hpp"
#include "engine_fixtures.hpp"
#include "core/l2_key.hpp"
#include "redis_server.hpp"
#include "serving/kv_block_store.hpp"

namespace ae = attention_echo;
namespace llama = attention_echo::llama;
namespace serving = attention_echo::serving;
using ae::testing::last_logits;
using ae::testing::max_abs_diff;
using ae::testing::RedisServer;

namespace {

const std::string kModelPath = std::string(AE_SOURCE_DIR) + "/models/echo-llama-6m/model.bin";

const llama::Model& model() {
  static const llama::Model m(llama::load_weights(kModelPath));
  return m;
}

std::vector<int> random_tokens(int n, std::uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::vector<int> t(n);
  for (int& x : t) x = 3 + static_cast<int>(rng() % (model().config().vocab_size - 3));
  return t;
}

serving::PlannerConfig with_store(const std::string& url, std::uint64_t fingerprint = model().fingerprint()) {
  serving::PlannerConfig c;
  c.store_url = url;
  c.model_fingerprint = fingerprint;
  return c;
}

TEST(ModelFingerprint, NamesTheWeights) {
  llama::Weights w = llama::load_weights(kModelPath);
  EXPECT_EQ(llama::Model(w).fingerprint(), model().fingerprint());
  w.layers[3].wv[17] += 1e-3f;
  EXPECT_NE(llama::Model(w).fingerprint(), model().fingerprint());
}

TEST(PlannerL2, BadConfigThrowsNamingTheField) {
  const auto& c = model().config();
  try {
    serving::Planner p(c, with_store("redis://127.0.0.1:6379", 0));
    ADD_FAILURE() << "no model_fingerprint accepted";
  } catch (const std::invalid_argument& e) {
    EXPECT_EQ(std::string(e.what()).rfind("model_fingerprint", 0), 0u) << e.what();
  }
  try {
    serving::Planner p(c, with_store("redis:/127.0.0.1"));
    ADD_FAILURE() << "a bad URL accepted";
  } catch (const std::invalid_argument& e) {
    EXPECT_EQ(std::string(e.what()).rfind("store_url", 0), 0u) << e.what();
  }
}

TEST(PlannerL2, ASecondPlannerReusesTheBlocksTheFirstComputed) {
  RedisServer server;
  AE_REQUIRE_REDIS(server);
  ae::ThreadPool pool(2);
  llama::Engine engine(model(), pool);
  const auto prompt = random_tokens(800, 1);
  const auto reference = last_logits(engine, prompt);

  serving::Planner a(model().config(), with_store(server.url()));
  serving::Plan first = a.plan(prompt);
  EXPECT_EQ(first.kv.length, 0);
  a.execute(engine, prompt, first);
  EXPECT_EQ(a.l2_stats().writes, 12u);  // the 12 full blocks of 64 tokens

  serving::Planner b(model().config(), with_store(server.url()));  // another replica: empty store
  serving::Plan plan = b.plan(prompt);
  EXPECT_EQ(plan.route, serving::Plan::Route::kReuse);
  EXPECT_EQ(plan.kv.length, 768);
  EXPECT_EQ(plan.report.reused_from_l2, 768);
  EXPECT_EQ(b.l2_stats().hits, 12u);
  EXPECT_LE(max_abs_diff(b.execute(engine, prompt, plan).logits, reference), 1e-4);
  EXPECT_EQ(b.l2_stats().writes, 0u);  // nothing it computed fills a new block

  // A prompt sharing the first 400 tokens: 6 blocks and 16 rows of the 7th
  // from B's own store now.
  auto other = prompt;
  const auto tail = random_tokens(800, 99);
  for (int i = 400; i < 800; ++i) other[i] = tail[i];
  if (other[400] == prompt[400]) other[400] = 3 + (prompt[400] - 2) % (model().config().vocab_size - 3);
  serving::Plan again = b.plan(other);
  EXPECT_EQ(again.kv.length, 400);
  EXPECT_EQ(again.report.reused_from_l2, 0);
}

TEST(PlannerL2, ModelsAndNamespacesNeverShareBlocks) {
  RedisServer server;
  AE_REQUIRE_REDIS(server);
  ae::ThreadPool pool(2);
  llama::Engine engine(model(), pool);
  const auto prompt = random_tokens(400, 2);
  serving::Planner a(model().config(), with_store(server.url()));
  serving::Plan p = a.plan(prompt, 0, "tenant-a");
  a.execute(engine, prompt, p);

  serving::Planner other_model(model().config(), with_store(server.url(), model().fingerprint() + 1));
  EXPECT_EQ(other_model.plan(prompt, 0, "tenant-a").kv.length, 0);
  serving::Planner b(model().config(), with_store(server.url()));
  EXPECT_EQ(b.plan(prompt, 0, "tenant-b").kv.length, 0);
  EXPECT_EQ(other_model.l2_stats().hits + b.l2_stats().hits, 0u);
  EXPECT_EQ(b.plan(prompt, 0, "tenant-a").kv.length, 384);  // the check can fail
}

TEST(PlannerL2, ABadBlockIsRejectedAndEndsTheRun) {
  RedisServer server;
  AE_REQUIRE_REDIS(server);
  ae::ThreadPool pool(2);
  llama::Engine engine(model(), pool);
  const auto prompt = random_tokens(800, 3);
  const auto reference = last_logits(engine, prompt);
  serving::Planner a(model().config(), with_store(server.url()));
  serving::Plan p = a.plan(prompt);
  a.execute(engine, prompt, p);

  // Block 5's value, bit-flipped.
  const serving::KVBlockStore names({model().config().n_layers, model().config().kv_dim()}, 1);
  const std::string suffix = ":" + ae::hex64(names.block_hashes("", prompt)[5]);
  std::vector<std::string> key;
  for (const std::string& k : ae::testing::keys_of(server))
    if (k.ends_with(suffix)) key.push_back(k);
  ASSERT_EQ(key.size(), 1u);
  const auto raw = ae::connect_redis(ae::parse_l2_url(server.url()));
  std::string value = *raw->get(key)[0];
  value[value.size() - 9] ^= 0x01;
  ASSERT_TRUE(ae::testing::put_one(*raw, key[0], value));

  serving::Planner b(model().config(), with_store(server.url()));
  serving::Plan plan = b.plan(prompt);
  EXPECT_EQ(plan.kv.length, 320);  // blocks 0-4
  EXPECT_EQ(b.l2_stats().rejected, 1u);
  EXPECT_LE(max_abs_diff(b.execute(engine, prompt, plan).logits, reference), 1e-4);
}

TEST(PlannerL2, ADownServerChangesNothingButSpeed) {
  RedisServer server;
  AE_REQUIRE_REDIS(server);
  server.stop();
  ae::ThreadPool pool(2);
  llama::Engine engine(model(), pool);
  const auto prompt = random_tokens(120, 4);
  serving::Planner a(model().config(), with_store(server.url()));
  serving::Plan p = a.plan(prompt);
  EXPECT_LE(max_abs_diff(a.execute(engine, prompt, p).logits, last_logits(engine, prompt)), 1e-4);
  serving::Plan again = a.plan(prompt);  // L1 still serves
  EXPECT_EQ(again.kv.length, 119);
  const ae::L2Stats s = a.l2_stats();
  EXPECT_EQ(s.hits + s.writes, 0u);
  EXPECT_GE(s.errors + s.unavailable, 1u);
}

}  // namespace
