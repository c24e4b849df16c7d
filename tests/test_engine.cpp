// Engine tests on a real checkpoint (AE_SHARED_DIR/data/aidreams260K): the llama2.c
// loader and tokenizer, a GGUF copy of the same weights written here, bad
// files, and the three attention routes agreeing with each other.
#include <gtest/gtest.h>
#include <unistd.h>

#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <limits>
#include <random>
#include <stdexcept>
#include <string>
#include <vector>

#include "attention_echo/engine.hpp"
#include "cli/bench.hpp"
#include "engine/gemm.hpp"

namespace ae = attention_echo;
namespace llama = attention_echo::llama;
namespace bench = attention_echo::bench;

namespace {

const std::string kModel = std::string(AE_SHARED_DIR) + "/data/aidreams260K/aidreams260K.bin";
const std::string kTokenizer = std::string(AE_SHARED_DIR) + "/data/aidreams260K/tok512.bin";

std::filesystem::path temp_dir() {
  return std::filesystem::temp_directory_path() / ("ae_engine_" + std::to_string(::getpid()));
}

std::string temp_path(const std::string& name) {
  std::filesystem::create_directories(temp_dir());
  return (temp_dir() / name).string();
}

// Removes this process's scratch files after the last test.
struct TempCleanup : ::testing::Environment {
  void TearDown() override { std::filesystem::remove_all(temp_dir()); }
};
[[maybe_unused]] auto* const kCleanup = ::testing::AddGlobalTestEnvironment(new TempCleanup);

// Throws when the file is missing: the tests that edit a checkpoint's bytes
// would otherwise write past an empty buffer (AE_SHARED_DIR not found).
std::vector<char> read_bytes(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw std::runtime_error(path + ": cannot open (test data under AE_SHARED_DIR)");
  return {std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>()};
}

void write_bytes(const std::string& path, const std::vector<char>& bytes) {
  // A fresh file each time: truncating one in place makes ext4 flush it.
  std::filesystem::remove(path);
  std::ofstream out(path, std::ios::binary);
  out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
}

std::vector<float> all_logits(const llama::Model& model, const std::vector<int>& tokens) {
  ae::ThreadPool pool(2);
  llama::Engine engine(model, pool);
  llama::KVState kv;
  return engine.forward(tokens, kv, {}, -1).logits;
}

double max_abs_diff(const std::vector<float>& a, const std::vector<float>& b) {
  EXPECT_EQ(a.size(), b.size());
  double m = 0.0;
  for (std::size_t i = 0; i < std::min(a.size(), b.size()); ++i) m = std::max(m, std::fabs(double(a[i]) - b[i]));
  return m;
}

// ---- a minimal GGUF writer (the layout llama.cpp's convert script emits) ----

std::uint16_t float_to_half(float f) {
  std::uint32_t x;
  std::memcpy(&x, &f, 4);
  const std::uint32_t sign = (x >> 16) & 0x8000u;
  const int exp = static_cast<int>((x >> 23) & 0xff) - 127 + 15;
  std::uint32_t mant = x & 0x7fffffu;
  if (exp <= 0) return static_cast<std::uint16_t>(sign);  // flush tiny values to zero
  if (exp >= 31) return static_cast<std::uint16_t>(sign | 0x7c00u);
  std::uint32_t h = sign | (static_cast<std::uint32_t>(exp) << 10) | (mant >> 13);
  const std::uint32_t rest = mant & 0x1fffu;
  if (rest > 0x1000u || (rest == 0x1000u && (h & 1u))) ++h;  // round to nearest even
  return static_cast<std::uint16_t>(h);
}

class GgufWriter {
 public:
  void u32(std::uint32_t v) { raw(&v, 4); }
  void u64(std::uint64_t v) { raw(&v, 8); }
  void str(const std::string& s) {
    u64(s.size());
    raw(s.data(), s.size());
  }
  void kv_u32(const std::string& key, std::uint32_t v) {
    str(key);
    u32(4);
    u32(v);
  }
  void kv_f32(const std::string& key, float v) {
    str(key);
    u32(6);
    raw(&v, 4);
  }
  void kv_str(const std::string& key, const std::string& v) {
    str(key);
    u32(8);
    str(v);
  }
  void raw(const void* p, std::size_t n) {
    const char* c = static_cast<const char*>(p);
    bytes.insert(bytes.end(), c, c + n);
  }
  std::vector<char> bytes;
};

struct Tensor {
  std::string name;
  std::vector<std::uint64_t> dims;  // ggml order
  const std::vector<float>* data;
};

std::vector<char> write_gguf(const llama::Weights& w, bool f16) {
  const llama::ModelConfig& c = w.config;
  std::vector<Tensor> tensors = {{"token_embd.weight", {std::uint64_t(c.dim), std::uint64_t(c.vocab_size)}, &w.token_embedding}};
  const std::uint64_t d = c.dim, h = c.hidden_dim, kv = c.kv_dim();
  for (int l = 0; l < c.n_layers; ++l) {
    const std::string b = "blk." + std::to_string(l) + ".";
    const auto& L = w.layers[l];
    tensors.push_back({b + "attn_norm.weight", {d}, &L.attn_norm});
    tensors.push_back({b + "attn_q.weight", {d, d}, &L.wq});
    tensors.push_back({b + "attn_k.weight", {d, kv}, &L.wk});
    tensors.push_back({b + "attn_v.weight", {d, kv}, &L.wv});
    tensors.push_back({b + "attn_output.weight", {d, d}, &L.wo});
    tensors.push_back({b + "ffn_norm.weight", {d}, &L.ffn_norm});
    tensors.push_back({b + "ffn_gate.weight", {d, h}, &L.w_gate});
    tensors.push_back({b + "ffn_up.weight", {d, h}, &L.w_up});
    tensors.push_back({b + "ffn_down.weight", {h, d}, &L.w_down});
  }
  tensors.push_back({"output_norm.weight", {d}, &w.final_norm});
  GgufWriter g;
  g.raw("GGUF", 4);
  g.u32(3);
  g.u64(tensors.size());
  g.u64(9);
  g.kv_str("general.architecture", "llama");
  g.kv_u32("llama.embedding_length", c.dim);
  g.kv_u32("llama.block_count", c.n_layers);
  g.kv_u32("llama.attention.head_count", c.n_heads);
  g.kv_u32("llama.attention.head_count_kv", c.n_kv_heads);
  g.kv_u32("llama.feed_forward_length", c.hidden_dim);
  g.kv_u32("llama.context_length", c.seq_len);
  g.kv_f32("llama.rope.freq_base", 10000.0f);
  g.kv_f32("llama.attention.layer_norm_rms_epsilon", 1e-5f);
  std::uint64_t offset = 0;
  // Norm vectors stay F32 as llama.cpp's converter keeps them.
  auto elem = [&](const Tensor& t) { return f16 && t.dims.size() == 2 ? 2u : 4u; };
  for (const auto& t : tensors) {
    g.str(t.name);
    g.u32(static_cast<std::uint32_t>(t.dims.size()));
    for (auto dim : t.dims) g.u64(dim);
    g.u32(elem(t) == 2 ? 1 : 0);
    g.u64(offset);
    offset += (t.data->size() * elem(t) + 31) / 32 * 32;
  }
  g.bytes.resize((g.bytes.size() + 31) / 32 * 32, 0);
  for (const auto& t : tensors) {
    const std::size_t start = g.bytes.size();
    for (float v : *t.data) {
      if (elem(t) == 2) {
        const std::uint16_t half = float_to_half(v);
        g.raw(&half, 2);
      } else {
        g.raw(&v, 4);
      }
    }
    g.bytes.resize(start + (g.bytes.size() - start + 31) / 32 * 32, 0);
  }
  return g.bytes;
}

const std::vector<int> kProbe = {1, 34, 300, 5, 77, 411, 13, 256, 2, 99, 140, 7, 450, 61, 3, 222};

}  // namespace

TEST(EngineLlama2c, GreedyFromBosIsTheKnownText) {
  const llama::Model model(llama::load_llama2c(kModel));
  const llama::Tokenizer tok(kTokenizer, model.config().vocab_size);
  EXPECT_EQ(model.config().dim, 64);
  EXPECT_EQ(model.config().n_layers, 4);
  EXPECT_EQ(model.config().vocab_size, 512);
  ae::ThreadPool pool(2);
  llama::Engine engine(model, pool);
  llama::KVState kv;
  std::vector<int> tokens = {llama::Tokenizer::kBos};
  std::string text;
  auto r = engine.forward(tokens, kv, {});
  for (int step = 0; step < 24; ++step) {
    const int next = static_cast<int>(std::max_element(r.logits.begin(), r.logits.end()) - r.logits.begin());
    text += tok.decode(tokens.back(), next);
    tokens.push_back(next);
    r = engine.forward(std::span<const int>(&tokens.back(), 1), kv, {});
  }
  EXPECT_EQ(text.rfind("\"Echoes of vectors unfold, a gentle hum of precision,", 0), 0u) << text;
}

TEST(EngineTokenizer, RoundTripsAndFallsBackToBytes) {
  const llama::Tokenizer tok(kTokenizer, 512);
  const std::string text = "Echoes of vectors unfold, a gentle hum of precision. Zürich \x01!";
  const auto ids = tok.encode(text);
  ASSERT_FALSE(ids.empty());
  EXPECT_EQ(ids[0], llama::Tokenizer::kBos);
  EXPECT_LT(ids.size(), text.size());  // merges happened
  std::string back;
  for (std::size_t i = 1; i < ids.size(); ++i) back += tok.decode(ids[i - 1], ids[i]);
  EXPECT_EQ(back, text);
  // "\x01" has no piece: its byte token is <0x01> = id 4 in llama2.c vocabularies.
  EXPECT_NE(std::find(ids.begin(), ids.end(), 4), ids.end());
  EXPECT_EQ(tok.encode("", {false, false, true}), std::vector<int>{});
  EXPECT_THROW(tok.decode(1, 512), std::invalid_argument);
}

// Found by fuzz_tokenizer: a piece length up to the header's max_len was
// allocated before the file was checked to hold it (gigabytes for a few
// bytes of input).
TEST(EngineTokenizer, APieceLongerThanTheFileIsRefusedBeforeAllocating) {
  const std::string path = temp_path("lying_tokenizer.bin");
  const std::int32_t max_len = std::numeric_limits<std::int32_t>::max();
  const float score = 0.0f;
  std::vector<char> bytes(12);
  std::memcpy(bytes.data(), &max_len, 4);
  std::memcpy(bytes.data() + 4, &score, 4);
  std::memcpy(bytes.data() + 8, &max_len, 4);  // token 0 claims 2 GiB
  write_bytes(path, bytes);
  try {
    llama::Tokenizer(path, 4);
    ADD_FAILURE() << "loaded a lying tokenizer";
  } catch (const std::runtime_error& e) {
    EXPECT_NE(std::string(e.what()).find("runs past the end of the file"), std::string::npos) << e.what();
  }
}

// Found by fuzz_tokenizer: a vocabulary of 1 or 2 pieces loaded, and encode
// returned BOS (id 1) outside it.
TEST(EngineTokenizer, AVocabularyWithoutBosAndEosIsRefused) {
  for (int vocab : {-1, 0, 1, 2}) EXPECT_THROW(llama::Tokenizer(kTokenizer, vocab), std::invalid_argument) << vocab;
}

TEST(EngineTokenizer, ByteVocabularyHasNoDummyPrefix) {
  const std::string path = std::string(AE_SOURCE_DIR) + "/models/echo-llama-6m/tokenizer.bin";
  if (!std::filesystem::exists(path)) GTEST_SKIP() << "no bundled model";
  const llama::Tokenizer tok(path, 259);
  EXPECT_EQ(tok.encode("ab\xff"), (std::vector<int>{1, 'a' + 3, 'b' + 3, 0xff + 3}));
  // The sentencepiece-trained vocabulary keeps llama2.c's leading " ".
  const llama::Tokenizer merged(kTokenizer, 512);
  EXPECT_EQ(merged.decode(1, merged.encode("Echoes")[1]).front(), 'E');
  EXPECT_NE(merged.encode("Echoes"), merged.encode("Echoes", {.bos = true, .eos = false, .dummy_prefix = false}));
}

// A GGUF file's vocabulary (Weights::vocabulary) as a tokenizer; the
// end-to-end check against tokenizer.bin is tests/engine/test_gguf_quantized.py.
TEST(EngineTokenizer, GgufVocabularyEncodesAndBadOnesAreRefusedByName) {
  llama::Weights::Vocabulary v{.model = "llama",
                               .pieces = {"", "", "", "a", "b", " ab", " ", " a"},
                               .scores = {0, 0, 0, -1, -2, 5, -3, 1}};
  EXPECT_EQ(llama::Tokenizer(v).encode("ab"), (std::vector<int>{1, 5}));
  auto refused = [](llama::Weights::Vocabulary bad) {
    try {
      llama::Tokenizer t(bad);
      ADD_FAILURE() << "accepted";
    } catch (const std::invalid_argument& e) {
      EXPECT_NE(std::string(e.what()).find("vocabulary"), std::string::npos) << e.what();
    }
  };
  llama::Weights::Vocabulary bad = v;
  bad.model = "bert";
  refused(bad);
  bad = v;
  bad.scores.pop_back();
  refused(bad);
  bad = v;
  bad.bos = 0;
  refused(bad);
  refused({.model = "llama", .pieces = {"", ""}, .scores = {0, 0}});
}

// A "gpt2" (byte-level BPE) vocabulary: GPT-2's byte alphabet (printable
// Latin-1 as itself, the rest from U+0100: " " is "\u0120"), merges by
// rank; the end-to-end check against Hugging Face's tokenizers is
// tests/engine/test_gguf_byte_level_bpe.py.
TEST(EngineTokenizer, ByteLevelVocabularyMergesByRankAndBadOnesAreRefusedByName) {
  auto alphabet = [](int b) {
    const bool printable = (b >= 0x21 && b <= 0x7E) || (b >= 0xA1 && b <= 0xAC) || b >= 0xAE;
    int cp = b;
    if (!printable) {
      cp = 256;
      for (int c = 0; c < b; ++c) cp += !((c >= 0x21 && c <= 0x7E) || (c >= 0xA1 && c <= 0xAC) || c >= 0xAE);
    }
    std::string s;
    if (cp < 0x80) s += static_cast<char>(cp);
    else s += {static_cast<char>(0xC0 | cp >> 6), static_cast<char>(0x80 | (cp & 0x3F))};
    return s;
  };
  llama::Weights::Vocabulary v{.model = "gpt2", .pre = "gpt2", .bos = 256, .eos = 256, .add_bos = false};
  for (int b = 0; b < 256; ++b) v.pieces.push_back(alphabet(b));
  v.pieces.push_back("");  // 256: a control token
  const std::string space = alphabet(' ');
  for (const std::string& piece : {std::string("ab"), space + "ab", std::string("bc")}) v.pieces.push_back(piece);  // 257-259
  v.merges = {"b c", "a b", space + " ab"};  // "bc" outranks "ab"
  const llama::Tokenizer tok(v);
  EXPECT_EQ(tok.encode("ab abc"), (std::vector<int>{257, ' ', 'a', 259}));  // " abc": "bc" first, then no " a"
  EXPECT_EQ(tok.encode("ab ab"), (std::vector<int>{257, 258}));
  EXPECT_EQ(tok.encode("ab", {.bos = true, .eos = true}), (std::vector<int>{256, 257, 256}));
  EXPECT_EQ(tok.decode(-1, 258), " ab");
  EXPECT_EQ(tok.decode(-1, 256), "");
  auto refused = [](llama::Weights::Vocabulary bad, const std::string& named) {
    try {
      llama::Tokenizer t(bad);
      ADD_FAILURE() << "accepted";
    } catch (const std::invalid_argument& e) {
      EXPECT_NE(std::string(e.what()).find(named), std::string::npos) << e.what();
    }
  };
  llama::Weights::Vocabulary bad = v;
  bad.pre = "deepseek-coder";
  refused(bad, "pre-tokenizer 'deepseek-coder'");
  bad = v;
  bad.eos = 260;
  refused(bad, "EOS id 260");
  // A byte with no token (SmolLM2 has none for 192, 193, 245-255 and a few
  // control bytes) loads, and only a text holding it is refused.
  llama::Weights::Vocabulary gap = v;
  gap.pieces[0x41] = "";
  const llama::Tokenizer gapped(gap);
  EXPECT_EQ(gapped.encode("bc"), (std::vector<int>{259}));
  try {
    (void)gapped.encode("bcA");
    ADD_FAILURE() << "accepted";
  } catch (const std::invalid_argument& e) {
    EXPECT_NE(std::string(e.what()).find("byte 65 has no token"), std::string::npos) << e.what();
  }
}

TEST(EngineGguf, SameWeightsGiveTheSameLogits) {
  const llama::Weights w = llama::load_llama2c(kModel);
  const std::string f32 = temp_path("model_f32.gguf"), f16 = temp_path("model_f16.gguf");
  write_bytes(f32, write_gguf(w, false));
  write_bytes(f16, write_gguf(w, true));
  const auto reference = all_logits(llama::Model(w), kProbe);
  const llama::Weights g = llama::load_weights(f32);
  EXPECT_EQ(g.config.dim, w.config.dim);
  EXPECT_EQ(g.config.vocab_size, w.config.vocab_size);
  EXPECT_EQ(max_abs_diff(all_logits(llama::Model(g), kProbe), reference), 0.0);
  // F16 storage rounds every weight by <= 2^-11 relative: logits move a little.
  EXPECT_LT(max_abs_diff(all_logits(llama::Model(llama::load_gguf(f16)), kProbe), reference), 0.05);
}

TEST(EngineBadFiles, TruncatedOrInconsistentFilesThrow) {
  const std::vector<char> good = read_bytes(kModel);
  const std::string path = temp_path("bad.bin");
  for (std::size_t cut : {std::size_t{0}, std::size_t{3}, std::size_t{27}, std::size_t{28}, good.size() / 2, good.size() - 4}) {
    write_bytes(path, std::vector<char>(good.begin(), good.begin() + static_cast<std::ptrdiff_t>(cut)));
    EXPECT_THROW(llama::load_weights(path), std::runtime_error) << "cut at " << cut;
  }
  std::vector<char> bad = good;
  const std::int32_t heads = 3;  // 64 is not a multiple of 3
  std::memcpy(bad.data() + 12, &heads, 4);
  write_bytes(path, bad);
  EXPECT_THROW(llama::load_weights(path), std::runtime_error);
  bad = good;
  const std::int32_t layers = 5;  // the file holds 4
  std::memcpy(bad.data() + 8, &layers, 4);
  write_bytes(path, bad);
  EXPECT_THROW(llama::load_weights(path), std::runtime_error);
  EXPECT_THROW(llama::load_weights(temp_path("does_not_exist.bin")), std::runtime_error);
  EXPECT_THROW(llama::Tokenizer(kModel, 512), std::runtime_error);  // not a tokenizer
}

TEST(EngineBadFiles, EveryTruncatedGgufThrows) {
  const std::vector<char> good = write_gguf(llama::load_llama2c(kModel), true);
  const std::string path = temp_path("bad.gguf");
  // Every cut inside the header and tensor table, then a spread over the data.
  for (std::size_t cut = 0; cut < good.size(); cut += cut < 4096 ? 1 : 9973) {
    write_bytes(path, std::vector<char>(good.begin(), good.begin() + static_cast<std::ptrdiff_t>(cut)));
    EXPECT_THROW(llama::load_gguf(path), std::runtime_error) << "cut at " << cut;
  }
  std::vector<char> bad = good;
  bad[0] = 'X';
  write_bytes(path, bad);
  EXPECT_THROW(llama::load_gguf(path), std::runtime_error);
  bad = good;
  bad[4] = 9;  // version 9
  write_bytes(path, bad);
  EXPECT_THROW(llama::load_gguf(path), std::runtime_error);
  // A tensor count far beyond what the file holds.
  bad = good;
  const std::uint64_t huge = 1ULL << 60;
  std::memcpy(bad.data() + 8, &huge, 8);
  write_bytes(path, bad);
  EXPECT_THROW(llama::load_gguf(path), std::runtime_error);
}

// Found by fuzz_llama2c_loader: a NaN weight loaded and failed later as an
// invalid "query" inside the forward. Non-finite weights are a corrupt file.
TEST(EngineBadFiles, NonFiniteWeightsAreRefusedNamingTheTensor) {
  const std::vector<char> good = read_bytes(kModel);
  const std::string path = temp_path("non_finite.bin");
  for (float bad_value : {std::numeric_limits<float>::quiet_NaN(), std::numeric_limits<float>::infinity()}) {
    std::vector<char> bad = good;
    std::memcpy(bad.data() + 28, &bad_value, 4);  // the first weight, past the 7-int header
    write_bytes(path, bad);
    try {
      llama::load_weights(path);
      ADD_FAILURE() << "loaded a non-finite weight";
    } catch (const std::runtime_error& e) {
      EXPECT_NE(std::string(e.what()).find(path), std::string::npos) << e.what();
      EXPECT_NE(std::string(e.what()).find("non-finite"), std::string::npos) << e.what();
    }
  }
  llama::Weights w = llama::load_llama2c(kModel);
  w.layers.back().w_up[5] = std::numeric_limits<float>::infinity();
  write_bytes(path, write_gguf(w, false));
  EXPECT_THROW(llama::load_gguf(path), std::runtime_error);
}

// Random byte flips in the header, metadata and tensor table: the loader
// either loads a valid model or throws; it never reads out of bounds (the
// sanitizer builds run this too).
TEST(EngineBadFiles, CorruptHeadersLoadOrThrow) {
  const std::vector<char> good = write_gguf(llama::load_llama2c(kModel), true);
  const std::vector<char> bin = read_bytes(kModel);
  const std::string path = temp_path("corrupt");
  std::mt19937 rng(11);
  for (int trial = 0; trial < 300; ++trial) {
    std::vector<char> bad = trial % 2 ? good : bin;
    const std::size_t span = trial % 2 ? 3000 : 28;
    for (int flips = 0; flips < 3; ++flips) bad[rng() % span] = static_cast<char>(rng());
    write_bytes(path, bad);
    try {
      llama::load_weights(path);
    } catch (const std::exception&) {
    }
  }
}

TEST(EngineGemm, EveryIsaMatchesANaiveProduct) {
  std::mt19937 rng(7);
  std::normal_distribution<float> dist;
  ae::ThreadPool pool(2);
  const std::vector<attention_echo::Isa> isas = attention_echo::supported_isas();
  for (auto [m, n, k] : {std::tuple{1, 5, 3}, std::tuple{7, 33, 64}, std::tuple{101, 70, 29}}) {
    std::vector<float> x(m * k), w(n * k), y0(m * n);
    for (auto& v : x) v = dist(rng);
    for (auto& v : w) v = dist(rng);
    for (auto& v : y0) v = dist(rng);
    for (auto isa : isas) {
      const auto packed = llama::pack(w.data(), n, k, isa);
      std::vector<float> y = y0;
      llama::gemm(x.data(), k, m, packed, y.data(), n, true, pool);
      for (int i = 0; i < m; ++i)
        for (int j = 0; j < n; ++j) {
          double want = y0[i * n + j];
          for (int c = 0; c < k; ++c) want += double(x[i * k + c]) * w[j * k + c];
          ASSERT_NEAR(y[i * n + j], want, 1e-4 * (1 + std::fabs(want))) << attention_echo::to_string(isa) << " " << m << "x" << n;
        }
    }
  }
}

TEST(EngineRoutes, ChunkedAndPrefixReuseMatchAFullForward) {
  const llama::Model model(llama::load_llama2c(kModel));
  const auto full = all_logits(model, kProbe);
  const int V = model.config().vocab_size, T = static_cast<int>(kProbe.size());
  ae::ThreadPool pool(2);
  llama::Engine engine(model, pool);
  // Rows [0, 5), then [5, T): the second call attends to cached K/V.
  llama::KVState kv;
  engine.forward(std::span<const int>(kProbe).first(5), kv, {});
  const auto tail = engine.forward(std::span<const int>(kProbe).subspan(5), kv, {}, -1).logits;
  EXPECT_LT(max_abs_diff(tail, std::vector<float>(full.begin() + 5 * V, full.end())), 1e-4);
  // A stored prompt shares the first 9 tokens with the probe.
  ae::serving::Planner planner(model.config());
  std::vector<int> other(kProbe.begin(), kProbe.begin() + 9);
  other.push_back(42);
  ae::serving::Plan first = planner.plan(other);
  planner.execute(engine, other, first);
  ae::serving::Plan plan = planner.plan(kProbe);
  ASSERT_EQ(plan.kv.length, 9);
  const auto last = planner.execute(engine, kProbe, plan).logits;
  EXPECT_LT(max_abs_diff(last, std::vector<float>(full.end() - V, full.end())), 1e-4);
  EXPECT_GT(engine.timers().attention_s, 0.0);
  EXPECT_GE(engine.timers().total_s, engine.timers().attention_s);
}

// embed -> layer_forward per layer -> head is forward(), row range by row
// range: the primitive a K/V-reusing tier is built from.
TEST(EngineRoutes, LayerPrimitiveComposesToForward) {
  const llama::Model model(llama::load_llama2c(kModel));
  const auto full = all_logits(model, kProbe);
  const auto& c = model.config();
  ae::ThreadPool pool(2);
  llama::Engine engine(model, pool);
  llama::KVState kv;
  const int split = 7, T = static_cast<int>(kProbe.size());
  for (auto [t0, t1] : {std::pair{0, split}, std::pair{split, T}}) {
    std::vector<float> x = engine.embed(std::span<const int>(kProbe).subspan(t0, t1 - t0));
    for (int l = 0; l < c.n_layers; ++l) engine.layer_forward(l, x.data(), t0, t1, kv, {});
    kv.length = t1;
    llama::ForwardResult r;
    engine.head(x.data(), t1 - t0, r);
    EXPECT_LT(max_abs_diff(r.logits, std::vector<float>(full.begin() + t0 * c.vocab_size,
                                                         full.begin() + t1 * c.vocab_size)), 1e-4);
  }
}

TEST(EngineRoutes, EchoCacheMissAndExactHitMatchThePlainPath) {
  const llama::Model model(llama::load_llama2c(kModel));
  const auto full = all_logits(model, kProbe);
  const int V = model.config().vocab_size, L = model.config().n_layers;
  ae::ThreadPool pool(2);
  llama::Engine engine(model, pool);
  ae::EchoConfig config;
  config.per_layer = true;
  config.threads = 1;
  ae::AttentionEchoCache cache(config);
  const int p = 10;
  llama::AttentionRoute route{&cache, p, std::span<const int>(kProbe).first(p), "test"};
  for (int call = 0; call < 2; ++call) {
    llama::KVState kv;
    const auto r = engine.forward(kProbe, kv, route);
    ASSERT_EQ(static_cast<int>(r.echo.size()), L);
    for (const auto& e : r.echo) EXPECT_EQ(e.tier, call == 0 ? ae::Tier::kNone : ae::Tier::kExact);
    EXPECT_LT(max_abs_diff(r.logits, std::vector<float>(full.end() - V, full.end())), 1e-4);
  }
  EXPECT_EQ(cache.stats().hits_exact, static_cast<std::uint64_t>(L));
}

// A planner without a cache always reuses the longest stored prefix; with
// one, a prompt whose shared context is not stored but has a stored
// neighbour goes through the cache, and the same prompt again skips its
// stored K/V. Every plan's logits match the plain forward.
TEST(EngineServing, PlannerPlansReuseOrCacheAndExecutes) {
  const llama::Model model(llama::load_llama2c(kModel));
  const auto full = all_logits(model, kProbe);
  const int V = model.config().vocab_size, T = static_cast<int>(kProbe.size());
  const std::vector<float> last(full.end() - V, full.end());
  ae::ThreadPool pool(2);
  llama::Engine engine(model, pool);
  using Route = ae::serving::Plan::Route;

  ae::serving::Planner exact(model.config());
  std::vector<int> other(kProbe.begin(), kProbe.begin() + 9);
  other.push_back(42);
  ae::serving::Plan cold = exact.plan(other, 5);
  EXPECT_EQ(cold.route, Route::kReuse);
  EXPECT_EQ(cold.kv.length, 0);
  exact.execute(engine, other, cold);
  EXPECT_EQ(cold.kv.length, 10);
  ae::serving::Plan warm = exact.plan(kProbe, 12);
  EXPECT_EQ(warm.kv.length, 9);
  EXPECT_LT(max_abs_diff(exact.execute(engine, kProbe, warm).logits, last), 1e-4);

  ae::EchoConfig config;
  config.per_layer = true;
  config.threads = 1;
  ae::AttentionEchoCache cache(config);
  ae::serving::Planner echo(model.config(), {.cache = &cache});
  std::vector<int> neighbour(kProbe);
  neighbour[0] = 42;  // shares no prefix, most trigrams
  ae::serving::Plan seed = echo.plan(neighbour, 0, "test");
  EXPECT_EQ(seed.route, Route::kReuse);  // a first-seen prompt never pays the cache's capture
  echo.execute(engine, neighbour, seed);
  ae::serving::Plan first = echo.plan(kProbe, 10, "test");
  ASSERT_EQ(first.route, Route::kCache);
  const auto r = echo.execute(engine, kProbe, first);
  EXPECT_EQ(static_cast<int>(r.echo.size()), model.config().n_layers);
  EXPECT_LT(max_abs_diff(r.logits, last), 1e-4);
  ae::serving::Plan again = echo.plan(kProbe, 10, "test");
  EXPECT_EQ(again.route, Route::kReuse);
  EXPECT_EQ(again.kv.length, T - 1);  // the last row is always computed
  EXPECT_TRUE(again.reused_exact);    // every layer of the first run was exact
  EXPECT_LT(max_abs_diff(echo.execute(engine, kProbe, again).logits, last), 1e-4);

  EXPECT_THROW(echo.plan(kProbe, T), std::invalid_argument);
  EXPECT_THROW(echo.plan(kProbe, -1), std::invalid_argument);
}

TEST(EngineRoutes, BadArgumentsThrowInvalidArgument) {
  const llama::Model model(llama::load_llama2c(kModel));
  ae::ThreadPool pool(1);
  llama::Engine engine(model, pool);
  llama::KVState kv;
  EXPECT_THROW(engine.forward(std::vector<int>{1, 512}, kv, {}), std::invalid_argument);
  EXPECT_THROW(engine.forward(std::vector<int>{}, kv, {}), std::invalid_argument);
  EXPECT_THROW(engine.forward(std::vector<int>(129, 1), kv, {}), std::invalid_argument);
  EXPECT_EQ(kv.length, 0);
}

namespace {

// Held-out text in the bench's layout: code files and one prose document.
std::string synthetic_heldout() {
  std::string text;
  for (int f = 0; f < 6; ++f) {
    text += "#### FILE: Lib/module" + std::to_string(f) + ".py ####\n";
    for (int i = 0; i < 260; ++i)
      text += "    value_" + std::to_string(i % 17) + " = compute(" + std::to_string(i * (f + 3) % 101) +
              ")  # step " + std::to_string(i) + " of the module\n";
  }
  text += "#### FILE: pydoc_topics/dreams ####\n";
  for (int i = 0; i < 80; ++i) text += "Echoes of vectors unfold, a gentle hum of precision, line " + std::to_string(i) + ".\n";
  return text;
}

// The chatbot workload of `requests` requests at context 128, on the small
// checkpoint's tokenizer.
bench::Scenario small_chatbot(int requests) {
  const llama::Tokenizer tok(kTokenizer, 512);
  return bench::make_scenario("chatbot", synthetic_heldout(), tok, 128, requests, 3);
}

}  // namespace

TEST(EngineScenarios, DeterministicAndWithinTheContext) {
  const llama::Tokenizer tok(kTokenizer, 512);
  const std::string heldout = synthetic_heldout();
  for (const auto& name : bench::scenario_names()) {
    const auto a = bench::make_scenario(name, heldout, tok, 128, 12, 5);
    const auto b = bench::make_scenario(name, heldout, tok, 128, 12, 5);
    ASSERT_EQ(a.requests.size(), 12u) << name;
    for (std::size_t i = 0; i < a.requests.size(); ++i) {
      const auto& r = a.requests[i];
      EXPECT_EQ(r.tokens, b.requests[i].tokens) << name;
      EXPECT_GT(r.prefix_length, 0) << name;
      EXPECT_LT(r.prefix_length, static_cast<int>(r.tokens.size())) << name;
      EXPECT_FALSE(r.continuation.empty()) << name;
      EXPECT_LE(r.tokens.size() + r.continuation.size(), 128u) << name;
    }
    // Shared context is shared tokens: some two requests agree on a long prefix.
    std::size_t longest = 0;
    for (std::size_t i = 0; i < a.requests.size(); ++i)
      for (std::size_t j = i + 1; j < a.requests.size(); ++j) {
        const auto& x = a.requests[i].tokens;
        const auto& y = a.requests[j].tokens;
        const std::size_t n = std::min(x.size(), y.size());
        longest = std::max<std::size_t>(longest, std::mismatch(x.begin(), x.begin() + n, y.begin()).first - x.begin());
      }
    if (name != "near-dup") EXPECT_GT(longest, 40u) << name;
  }
  EXPECT_THROW(bench::make_scenario("chat", heldout, tok, 128, 4, 1), std::invalid_argument);
  EXPECT_THROW(bench::make_scenario("rag", "too little text\n", tok, 128, 4, 1), std::invalid_argument);
}

// Text without "#### FILE:" lines is one plain document: every scenario
// still builds from it.
TEST(EngineScenarios, PlainTextIsOneDocument) {
  const llama::Tokenizer tok(kTokenizer, 512);
  const std::string sectioned = synthetic_heldout();
  std::string plain;
  for (std::string_view rest = sectioned; !rest.empty();) {
    const std::size_t end = std::min(rest.find('\n'), rest.size() - 1) + 1;
    if (!rest.starts_with("#### FILE: ")) plain += rest.substr(0, end);
    rest.remove_prefix(end);
  }
  for (const auto& name : bench::scenario_names())
    EXPECT_EQ(bench::make_scenario(name, plain, tok, 128, 6, 2).requests.size(), 6u) << name;
}

TEST(EngineBench, ExactReuseIsLosslessAndTiersAddUp) {
  const llama::Model model(llama::load_llama2c(kModel));
  const auto scenario = small_chatbot(8);
  bench::BenchOptions options;
  options.threads = 2;
  int calls = 0;
  const auto report = bench::run_scenario(model, scenario, options, [&](int done, int total) {
    EXPECT_EQ(done, ++calls);
    EXPECT_EQ(total, 8);
  });
  ASSERT_EQ(report.modes.size(), 3u);
  for (const auto& m : report.modes) {
    EXPECT_EQ(m.requests, 8);
    EXPECT_NEAR(m.exact + m.partial + m.sparse + m.dense + m.miss, 8.0, 1e-9) << m.name;
    EXPECT_GT(m.prefill_s, 0.0);
    EXPECT_LE(m.attention_s, m.prefill_s);
  }
  const auto& exact = report.modes[1];
  EXPECT_EQ(exact.hidden_rel_err_max, 0.0);  // same kernels, same rows: bit-identical
  EXPECT_EQ(exact.top1_agree, 8);
  EXPECT_LT(exact.tokens_computed, exact.tokens_total);  // 3 system prompts over 8 requests
  EXPECT_NE(bench::format_report(report).find("exact-prefix"), std::string::npos);
  const auto json = bench::reports_to_json({report}, {{"k", 1}});
  EXPECT_EQ(json.begin().key(), "k");  // the run's fields first
  EXPECT_EQ(json.at("scenarios").at(0).at("scenario"), "chatbot");
  EXPECT_EQ(json.at("scenarios").at(0).at("modes").size(), 3u);
  // Every prompt's pages reserved in each planner before the first request.
  std::size_t pages = 0;
  for (const auto& r : scenario.requests) pages += (r.tokens.size() + 63) / 64;
  const auto& c = model.config();
  EXPECT_EQ(report.kv_reserved_bytes, pages * sizeof(float) * 2 * c.n_layers * 64 * c.kv_dim());
  EXPECT_EQ(json.at("scenarios").at(0).at("kv_reserved_bytes"), report.kv_reserved_bytes);
}

// Repeats time each request on more serving stacks; what is reported
// (routes, reuse, fidelity) stays the first stack's, as with one.
TEST(EngineBench, RepeatsReportTheFirstStacksServing) {
  const llama::Model model(llama::load_llama2c(kModel));
  const auto scenario = small_chatbot(6);
  bench::BenchOptions options;
  options.threads = 2;
  options.repeats = 1;
  const auto once = bench::run_scenario(model, scenario, options, {});
  options.repeats = 3;
  const auto thrice = bench::run_scenario(model, scenario, options, {});
  for (std::size_t m = 0; m < 3; ++m) {
    const auto &a = once.modes[m], &b = thrice.modes[m];
    EXPECT_EQ(b.requests, 6) << a.name;
    EXPECT_EQ(a.tokens_computed, b.tokens_computed) << a.name;
    EXPECT_EQ(a.nll_sum, b.nll_sum) << a.name;
    EXPECT_EQ(a.top1_agree, b.top1_agree) << a.name;
    ASSERT_EQ(a.per_request.size(), b.per_request.size()) << a.name;
    for (std::size_t i = 0; i < a.per_request.size(); ++i) {
      EXPECT_EQ(a.per_request[i].reused, b.per_request[i].reused) << a.name << " request " << i;
      EXPECT_EQ(b.per_request[i].repeats_on_another_route, 0) << a.name << " request " << i;  // exact reuse only
    }
  }
}

TEST(EngineBench, BadRepeatsAreRefusedByName) {
  const llama::Model model(llama::load_llama2c(kModel));
  const auto scenario = small_chatbot(2);
  auto refused = [&](int repeats, const std::string& store_url) {
    bench::BenchOptions options;
    options.repeats = repeats;
    options.store_url = store_url;
    try {
      bench::run_scenario(model, scenario, options, {});
    } catch (const std::invalid_argument& e) {
      EXPECT_EQ(std::string(e.what()).rfind("repeats:", 0), 0u) << e.what();
      return true;
    }
    return false;
  };
  EXPECT_TRUE(refused(0, ""));
  EXPECT_TRUE(refused(2, "redis://127.0.0.1:1"));  // refused before any connection
}
