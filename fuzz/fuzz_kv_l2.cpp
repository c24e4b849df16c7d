// The planner's K/V blocks in the shared L2 store (serving/kv_l2.hpp), read
// back through a store that does what a Redis shared by many processes may:
// loses values, answers only the first keys before the deadline, drops
// writes, or hands back bytes other than those written (a bit flipped, the
// value cut short or run on, another key's value, or a value another writer
// formed with a valid checksum but its own format, key, shape, tokens or
// K/V size). Three writers share it (two models of one shape, one of
// another) in namespaces that need escaping in a key. A fetch must return
// exactly the run of blocks from `first` that its model wrote for these
// tokens in this namespace, up to the first value missing or altered; an
// altered value is counted rejected, once; every row handed back is the one
// its writer's exact forward of those tokens wrote.
#include <fuzzer/FuzzedDataProvider.h>

#include <algorithm>
#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "attention_echo/l2_store.hpp"
#include "core/binary_writer.hpp"
#include "core/checksum.hpp"
#include "core/l2_key.hpp"
#include "fuzz_faulty_store.hpp"
#include "fuzz_prompts.hpp"
#include "fuzz_require.hpp"
#include "serving/kv_block_store.hpp"
#include "serving/kv_l2.hpp"

namespace {

namespace ae = attention_echo;
namespace llama = ae::llama;
namespace serving = ae::serving;

using ae::fuzzing::FaultyStore;
using ae::fuzzing::Met;
using ae::fuzzing::require;

constexpr int kBlock = 64;

struct Writer {
  std::uint64_t model_fingerprint;
  serving::KVBlockStore::Shape shape;
};
constexpr Writer kWriters[] = {{1, {2, 2, kBlock}}, {2, {2, 2, kBlock}}, {1, {1, 2, kBlock}}};
const std::string kSpaces[] = {"", "a", "a:2", "a%3A2", " a"};

// The K/V writer w's exact forward of `tokens` writes in namespace ns, as
// its pages hold them: K/V do not depend on the namespace, but tagging the
// rows with it (and the writer) makes a row read across namespaces or
// models show. Each value is exactly representable and never 0 (a zeroed
// page).
class ExactKV {
 public:
  ExactKV(int w, const std::string& ns, std::span<const int> tokens) : shape_(kWriters[w].shape) {
    std::uint32_t h = mix(2166136261u, static_cast<std::uint32_t>(w));
    for (unsigned char c : ns) h = mix(h, c);
    for (int t : tokens) prefix_.push_back(h = mix(h, static_cast<std::uint32_t>(t)));
  }
  // Element d of row t in plane p (K of layer l is plane 2l, V 2l + 1).
  float at(int p, int t, int d) const { return static_cast<float>(mix(mix(prefix_[t], p), d) % (1u << 20) + 1); }
  // Block b as a page: [plane][row][d].
  std::vector<float> page(int b) const {
    std::vector<float> out;
    for (int p = 0; p < 2 * shape_.layers; ++p)
      for (int t = b * kBlock; t < (b + 1) * kBlock; ++t)
        for (int d = 0; d < shape_.kv_dim; ++d) out.push_back(at(p, t, d));
    return out;
  }
  llama::KVState state() const {
    llama::KVState kv;
    const int T = static_cast<int>(prefix_.size());
    kv.make_writable(0, T, shape_.layers, shape_.kv_dim);
    for (int t = 0; t < T; ++t)
      for (int l = 0; l < shape_.layers; ++l)
        for (int d = 0; d < shape_.kv_dim; ++d) {
          kv.writable_k(l, t)[d] = at(2 * l, t, d);
          kv.writable_v(l, t)[d] = at(2 * l + 1, t, d);
        }
    kv.length = T;
    return kv;
  }

 private:
  static std::uint32_t mix(std::uint32_t h, std::uint32_t x) { return (h ^ x) * 16777619u; }
  serving::KVBlockStore::Shape shape_;
  std::vector<std::uint32_t> prefix_;  // a hash of tokens [0, t] per t
};

// What the block a fetch asks for at one key should hold.
struct Wanted {
  std::vector<int> tokens;
  std::vector<float> page;
  serving::KVBlockStore::Shape shape;
};

// A value for `key` with a valid checksum whose fields are each the right
// one (w's) or the input's: intact only if every one came out right.
std::string forged(FuzzedDataProvider& in, const Wanted& w, const std::string& key, bool& intact) {
  bool right = true;
  auto field = [&](auto correct, auto other) {
    const auto value = in.ConsumeBool() ? correct : other;
    right = right && value == correct;
    return value;
  };
  ae::BinaryWriter body;
  body.put_string(field(key, in.ConsumeRandomLengthString(64)));
  for (int correct : {w.shape.layers, w.shape.kv_dim, w.shape.block_tokens})
    body.put<std::int32_t>(field(correct, in.ConsumeIntegral<std::int32_t>()));
  std::vector<std::int32_t> tokens(w.tokens.begin(), w.tokens.end());
  if (in.ConsumeBool())
    tokens[in.ConsumeIntegralInRange<std::size_t>(0, tokens.size() - 1)] = in.ConsumeIntegral<std::int32_t>();
  right = right && std::equal(tokens.begin(), tokens.end(), w.tokens.begin());
  body.put_vector(tokens);
  std::vector<float> page = w.page;
  page.resize(field(page.size(), in.ConsumeIntegralInRange<std::size_t>(0, 2 * page.size())), 1.0f);
  body.put_vector(page);
  const std::string bytes = body.bytes() + field(std::string(), in.ConsumeBytesAsString(8));
  ae::BinaryWriter value;
  value.put<std::uint32_t>(field(ae::kL2Format, in.ConsumeIntegral<std::uint32_t>()));
  value.put<std::uint64_t>(ae::fnv1a(bytes));
  value.put_raw(bytes);
  intact = right;
  return value.bytes();
}

struct Fixture {
  explicit Fixture(FuzzedDataProvider& in)
      : store(std::make_shared<FaultyStore>(in, [this, &in](const std::string& key, std::size_t i, bool& intact) {
          return forged(in, wanted[i], key, intact);
        })) {
    for (const Writer& w : kWriters) {
      l2.emplace_back(store, w.model_fingerprint, w.shape);
      hashing.emplace_back(w.shape, std::size_t{1} << 20);
    }
  }
  std::vector<Wanted> wanted;  // per key of the next get(), for forged values
  std::shared_ptr<FaultyStore> store;
  std::vector<serving::KVBlocksL2> l2;
  std::vector<serving::KVBlockStore> hashing;  // block_hashes only
};

void fetch(Fixture& f, int w, const std::string& ns, const std::vector<int>& tokens, int first) {
  const auto hashes = f.hashing[w].block_hashes(ns, tokens);
  const ExactKV exact(w, ns, tokens);
  f.wanted.clear();
  for (std::size_t b = first; b < hashes.size(); ++b)
    f.wanted.push_back({std::vector<int>(tokens.begin() + b * kBlock, tokens.begin() + (b + 1) * kBlock),
                               exact.page(static_cast<int>(b)), kWriters[w].shape});
  f.store->met.clear();
  const std::uint64_t rejected = f.store->stats().rejected;
  const std::vector<serving::Block> blocks = f.l2[w].fetch(ns, tokens, hashes, first);
  const auto& met = f.store->met;
  const std::size_t run = std::find_if(met.begin(), met.end(), [](Met m) { return m != Met::kIntact; }) - met.begin();
  require(blocks.size() == run);
  require(f.store->stats().rejected - rejected == (run < met.size() && met[run] == Met::kAltered ? 1u : 0u));
  for (std::size_t i = 0; i < blocks.size(); ++i) require(blocks[i]->data == f.wanted[i].page);
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  FuzzedDataProvider in(data, size);
  Fixture f(in);
  std::vector<std::vector<int>> prompts;
  for (int op = 0; op < 32 && in.remaining_bytes() > 0; ++op) {
    const int w = in.ConsumeIntegralInRange(0, 2);
    const std::string& ns = kSpaces[in.ConsumeIntegralInRange(0, 4)];
    prompts.push_back(ae::fuzzing::next_prompt(in, prompts, 300, 3));
    const std::vector<int>& tokens = prompts.back();
    const int blocks = static_cast<int>(tokens.size()) / kBlock;
    const int first = in.ConsumeIntegralInRange(0, blocks);
    if (in.ConsumeBool()) {
      f.l2[w].put(ns, tokens, f.hashing[w].block_hashes(ns, tokens), first, ExactKV(w, ns, tokens).state());
    } else {
      fetch(f, w, ns, tokens, first);
    }
  }
  return 0;
}
