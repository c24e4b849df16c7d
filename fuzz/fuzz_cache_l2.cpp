// The cache's entries in the shared L2 store (cache/l2_entries.hpp), read
// back through a store that loses, cuts short, drops or alters values
// (fuzz_faulty_store.hpp; a forged value is another key's entry put under
// this key with a valid checksum). Three caches share it, as three
// processes would: two run one model, the third another of the same shape,
// in namespaces that need escaping in a key. A call names its prefix by
// tokens (the exact tier's key) or by embeddings alone (the semantic key's).
// Every output is checked against exact attention (bit-identical for a miss
// or an exact hit, within max_error for an approximate one), and every read
// of L2: a value altered in the store, or intact but holding another
// model's rows for those tokens (its k fingerprint differs), is counted
// rejected, once, and the call is computed; an intact value of the call's
// own model is served as an exact hit; an intact semantic one is served or
// refused by the guard.
#include <fuzzer/FuzzedDataProvider.h>

#include <cstdint>
#include <cstring>
#include <iterator>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "attention_echo/attention.hpp"
#include "attention_echo/cache.hpp"
#include "core/binary_reader.hpp"
#include "core/binary_writer.hpp"
#include "core/checksum.hpp"
#include "fuzz_faulty_store.hpp"
#include "fuzz_prompts.hpp"
#include "fuzz_require.hpp"

namespace {

namespace ae = attention_echo;
using ae::fuzzing::FaultyStore;
using ae::fuzzing::Met;
using ae::fuzzing::require;

constexpr int kHeads = 2, kKvHeads = 1, kDim = 8, kEmbedding = 8;
constexpr int kModelOf[] = {0, 0, 1};  // the model each cache (process) runs
const std::string kSpaces[] = {"", "a", "a:2", "a%3A2", " a"};

std::uint32_t mix(std::uint32_t h, std::uint32_t x) { return (h ^ x) * 16777619u; }

// A value in [-2, 2] in steps of 1/8, never NaN: a function of its row's
// tokens so far, so every process computes the same rows for the same
// tokens and model (what makes the exact tier's rows shareable).
float element(std::uint32_t row_hash, std::uint32_t plane, int i) {
  return static_cast<float>(static_cast<int>(mix(mix(row_hash, plane), static_cast<std::uint32_t>(i)) % 33) - 16) /
         8.0f;
}

// q, k, v (planes 0-2) of one model for a prompt, and its embeddings
// (plane 3, the same for every model: the semantic key names the text).
struct Inputs {
  std::vector<float> q, k, v, embeddings;
  int tokens;
  Inputs(int model, const std::vector<int>& prompt)
      : q(std::size_t{kHeads} * prompt.size() * kDim),
        k(std::size_t{kKvHeads} * prompt.size() * kDim),
        v(k.size()),
        tokens(static_cast<int>(prompt.size())) {
    std::uint32_t text = 2166136261u;
    for (int t = 0; t < tokens; ++t) {
      text = mix(text, static_cast<std::uint32_t>(prompt[t]));
      const std::uint32_t row = mix(text, static_cast<std::uint32_t>(model));
      for (int d = 0; d < kEmbedding; ++d) embeddings.push_back(element(text, 3, d));
      auto at = [&](int i) { return (static_cast<std::size_t>(i / kDim) * tokens + t) * kDim + i % kDim; };
      for (int i = 0; i < kHeads * kDim; ++i) q[at(i)] = element(row, 0, i);
      for (int i = 0; i < kKvHeads * kDim; ++i) k[at(i)] = element(row, 1, i), v[at(i)] = element(row, 2, i);
    }
  }
};

// Another key's entry put under `key` with a valid checksum (the body
// starts with the key it was written under); intact when that is the value
// written at `key` after all.
std::string forged(FuzzedDataProvider& in, const FaultyStore& store, const std::string& key, bool& intact) {
  const auto& values = store.values();
  auto other = values.begin();
  std::advance(other, in.ConsumeIntegralInRange<std::size_t>(0, values.size() - 1));
  ae::BinaryReader header(other->second, "value");
  const auto format = header.get<std::uint32_t>("format");
  header.get<std::uint64_t>("checksum");
  ae::BinaryReader body(std::string_view(other->second).substr(header.pos()), "body");
  body.get_string("key");
  ae::BinaryWriter rekeyed;
  rekeyed.put_string(key);
  rekeyed.put_raw(std::string_view(other->second).substr(header.pos() + body.pos()));
  ae::BinaryWriter value;
  value.put<std::uint32_t>(format);
  value.put<std::uint64_t>(ae::fnv1a(rekeyed.bytes()));
  value.put_raw(rekeyed.bytes());
  const auto written = values.find(key);
  intact = written != values.end() && written->second == value.bytes();
  return value.bytes();
}

struct Fixture {
  explicit Fixture(FuzzedDataProvider& in)
      : store(std::make_shared<FaultyStore>(in, [this, &in](const std::string& key, std::size_t, bool& intact) {
          return forged(in, *store, key, intact);
        })) {
    config.threads = 1;
    config.mode = static_cast<ae::EchoMode>(in.ConsumeIntegralInRange(0, 2));
    config.block_size = in.ConsumeBool() ? 32 : 64;
    config.per_layer = in.ConsumeBool();
    config.max_prefix_length = 128;
    for (std::size_t c = 0; c < std::size(kModelOf); ++c)
      caches.push_back(std::make_unique<ae::AttentionEchoCache>(config, store));
  }
  ae::EchoConfig config;
  std::shared_ptr<FaultyStore> store;
  std::vector<std::unique_ptr<ae::AttentionEchoCache>> caches;
  std::map<std::string, int> model_of;  // which model wrote each value
};

void check_output(const ae::EchoResult& r, const Inputs& x, const std::vector<float>& out, const ae::EchoRequest& req,
                  double max_error) {
  if (r.tier == ae::Tier::kSparse || r.tier == ae::Tier::kDense) {
    require(r.estimated_error <= max_error);
    return;
  }
  static ae::ThreadPool pool(1);
  std::vector<float> exact(out.size());
  ae::AttentionOptions o;
  o.causal = req.causal;
  o.prefix_length = req.causal ? 0 : req.prefix_length;
  ae::attention(ae::HeadsView::contiguous(x.q.data(), kHeads, x.tokens, kDim),
                ae::HeadsView::contiguous(x.k.data(), kKvHeads, x.tokens, kDim),
                ae::HeadsView::contiguous(x.v.data(), kKvHeads, x.tokens, kDim),
                ae::MutableHeadsView::contiguous(exact.data(), kHeads, x.tokens, kDim), o, pool);
  require(std::memcmp(exact.data(), out.data(), out.size() * sizeof(float)) == 0);
}

// One call of cache c; then what its one read of L2 (if any) met, against
// what the call did.
void call(Fixture& f, int c, const std::string& ns, const std::vector<int>& prompt, int prefix, bool by_tokens,
          bool causal, int layer) {
  const int model = kModelOf[c];
  const Inputs x(model, prompt);
  std::vector<float> out(x.q.size());
  const std::vector<std::int32_t> tokens(prompt.begin(), prompt.begin() + prefix);
  ae::EchoRequest req;
  req.prefix_length = prefix;
  req.prefix_embeddings = {x.embeddings.data(), prefix, kEmbedding};
  req.layer_id = layer;
  req.causal = causal;
  if (by_tokens) req.prefix_tokens = tokens;
  req.name_space = ns;
  f.store->asked.clear();
  f.store->met.clear();
  const std::map<std::string, std::string> before = f.store->values();
  const std::uint64_t rejected = f.store->stats().rejected;
  const ae::EchoResult r = f.caches[c]->attention_with_echo(
      ae::HeadsView::contiguous(x.q.data(), kHeads, x.tokens, kDim),
      ae::HeadsView::contiguous(x.k.data(), kKvHeads, x.tokens, kDim),
      ae::HeadsView::contiguous(x.v.data(), kKvHeads, x.tokens, kDim),
      ae::MutableHeadsView::contiguous(out.data(), kHeads, x.tokens, kDim), req);
  check_output(r, x, out, req, f.config.max_error);

  require(f.store->met.size() <= 1);  // at most one L2 read a call
  if (!f.store->met.empty()) {
    const Met met = f.store->met[0];
    const auto writer = f.model_of.find(f.store->asked[0]);
    const bool other_model = by_tokens && met == Met::kIntact && writer != f.model_of.end() && writer->second != model;
    const bool refused = met == Met::kAltered || other_model;
    require(f.store->stats().rejected - rejected == (refused ? 1u : 0u));
    if (met == Met::kIntact && !refused)
      require(by_tokens ? r.tier == ae::Tier::kExact : r.tier != ae::Tier::kNone || r.rejected);
  }
  for (const auto& [key, value] : f.store->values()) {
    const auto was = before.find(key);
    if (was == before.end() || was->second != value) f.model_of[key] = model;
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  FuzzedDataProvider in(data, size);
  Fixture f(in);
  std::vector<std::vector<int>> prompts;
  for (int op = 0; op < 24 && in.remaining_bytes() > 0; ++op) {
    const int c = in.ConsumeIntegralInRange(0, 2);
    const std::string& ns = kSpaces[in.ConsumeIntegralInRange(0, 4)];
    prompts.push_back(ae::fuzzing::next_prompt(in, prompts, 100, 3));
    if (prompts.back().size() > 200) prompts.back().resize(200);
    const std::vector<int>& prompt = prompts.back();
    const int prefix = in.ConsumeIntegralInRange(1, static_cast<int>(prompt.size()));
    const bool by_tokens = in.ConsumeBool(), causal = in.ConsumeBool();
    call(f, c, ns, prompt, prefix, by_tokens, causal, in.ConsumeIntegralInRange(0, 1));
  }
  return 0;
}
