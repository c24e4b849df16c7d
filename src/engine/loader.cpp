// Checkpoint loaders: llama2.c legacy .bin and GGUF. Both read the whole file
// and check every size against it before copying a byte, so a truncated or
// inconsistent file is a std::runtime_error, never a read past the end.
#include <cmath>
#include <cstring>
#include <fstream>
#include <limits>
#include <map>
#include <optional>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <variant>
#include <vector>

#include "attention_echo/llama.hpp"
#include "core/binary_reader.hpp"
#include "engine/ggml_quants.hpp"

namespace attention_echo::llama {
namespace {

[[noreturn]] void bad_file(const std::string& path, const std::string& what) {
  throw std::runtime_error(path + ": " + what);
}

// A checkpoint with a NaN or Inf weight is corrupt: refused here, with the
// tensor named, rather than failing later as non-finite activations.
Weights require_finite(Weights w, const std::string& path) {
  auto check = [&](const std::vector<float>& tensor, const std::string& name) {
    for (float x : tensor)
      if (!std::isfinite(x)) bad_file(path, "tensor " + name + " has a non-finite value");
  };
  check(w.token_embedding, "token_embedding");
  for (std::size_t l = 0; l < w.layers.size(); ++l) {
    const Weights::Layer& layer = w.layers[l];
    const std::string at = " of layer " + std::to_string(l);
    for (const auto& [tensor, name] : {std::pair{&layer.attn_norm, "attn_norm"}, {&layer.wq, "wq"}, {&layer.wk, "wk"},
                                       {&layer.wv, "wv"}, {&layer.wo, "wo"}, {&layer.ffn_norm, "ffn_norm"},
                                       {&layer.w_gate, "w_gate"}, {&layer.w_down, "w_down"}, {&layer.w_up, "w_up"}})
      check(*tensor, name + at);
  }
  check(w.final_norm, "final_norm");
  check(w.classifier, "classifier");
  return w;
}

std::vector<char> read_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary | std::ios::ate);
  if (!in) throw std::runtime_error(path + ": cannot open file");
  const auto size = static_cast<std::size_t>(in.tellg());
  std::vector<char> bytes(size);
  in.seekg(0);
  if (!in.read(bytes.data(), static_cast<std::streamsize>(size))) bad_file(path, "read failed");
  return bytes;
}

// ---- llama2.c -------------------------------------------------------------

Weights parse_llama2c(const std::vector<char>& bytes, const std::string& path) {
  BinaryReader r({bytes.data(), bytes.size()}, path);
  std::int32_t header[7];
  for (auto& h : header) h = r.get<std::int32_t>("header");
  if (std::memcmp(bytes.data(), "ak42", 4) == 0 || header[0] == 0x616b3432)
    bad_file(path, "llama2.c versioned export (magic ak42) is not supported; export with --version 0");
  Weights w;
  ModelConfig& c = w.config;
  c.dim = header[0];
  c.hidden_dim = header[1];
  c.n_layers = header[2];
  c.n_heads = header[3];
  c.n_kv_heads = header[4];
  const bool shared = header[5] > 0;
  c.vocab_size = header[5] == std::numeric_limits<std::int32_t>::min() ? 0 : std::abs(header[5]);
  c.seq_len = header[6];
  try {
    c.validate();
  } catch (const std::runtime_error& e) {
    bad_file(path, std::string("inconsistent llama2.c header: ") + e.what());
  }
  // Expected size in floats, computed in 64 bits before anything is read.
  const std::uint64_t d = c.dim, h = c.hidden_dim, L = c.n_layers, V = c.vocab_size,
                      kv = c.kv_dim(), S = c.seq_len, hd = c.head_dim();
  const std::uint64_t floats = V * d + L * (2 * d + d * d * 2 + kv * d * 2 + h * d * 3) + d +
                               S * hd + (shared ? 0 : V * d);
  const std::uint64_t expected = 7 * 4 + floats * 4;
  if (bytes.size() != expected)
    bad_file(path, "file is " + std::to_string(bytes.size()) + " bytes but its header (dim " +
                       std::to_string(d) + ", hidden " + std::to_string(h) + ", layers " +
                       std::to_string(L) + ", vocab " + std::to_string(V) + ", seq_len " +
                       std::to_string(S) + ") needs " + std::to_string(expected));

  w.token_embedding = r.get_array<float>(V * d, "token_embedding");
  w.layers.resize(L);
  // llama2.c groups each tensor kind over all layers.
  auto per_layer = [&](std::vector<float> Weights::Layer::*field, std::uint64_t n, const char* what) {
    for (auto& layer : w.layers) layer.*field = r.get_array<float>(n, what);
  };
  per_layer(&Weights::Layer::attn_norm, d, "rms_att_weight");
  per_layer(&Weights::Layer::wq, d * d, "wq");
  per_layer(&Weights::Layer::wk, kv * d, "wk");
  per_layer(&Weights::Layer::wv, kv * d, "wv");
  per_layer(&Weights::Layer::wo, d * d, "wo");
  per_layer(&Weights::Layer::ffn_norm, d, "rms_ffn_weight");
  per_layer(&Weights::Layer::w_gate, h * d, "w1");
  per_layer(&Weights::Layer::w_down, d * h, "w2");
  per_layer(&Weights::Layer::w_up, h * d, "w3");
  w.final_norm = r.get_array<float>(d, "rms_final_weight");
  r.take(S * hd * sizeof(float), "freq_cis");  // RoPE tables: recomputed, not read
  if (!shared) w.classifier = r.get_array<float>(V * d, "wcls");
  return w;
}

// ---- GGUF -----------------------------------------------------------------

enum GgufType : std::uint32_t {
  kU8 = 0, kI8, kU16, kI16, kU32, kI32, kF32, kBool, kString, kArray, kU64, kI64, kF64
};

// Metadata values: scalars, and arrays of strings or of numbers (the
// tokenizer's pieces, scores and token types); nested arrays are refused.
using GgufValue = std::variant<std::uint64_t, std::int64_t, double, std::string, std::vector<std::string>,
                               std::vector<double>>;

std::size_t scalar_size(std::uint32_t type, const std::string& path) {
  switch (type) {
    case kU8: case kI8: case kBool: return 1;
    case kU16: case kI16: return 2;
    case kU32: case kI32: case kF32: return 4;
    case kU64: case kI64: case kF64: return 8;
    default: bad_file(path, "unknown GGUF metadata type " + std::to_string(type));
  }
}

GgufValue read_value(BinaryReader& r, std::uint32_t type, const std::string& path);

GgufValue read_array(BinaryReader& r, const std::string& path) {
  const auto elem = r.get<std::uint32_t>("array type");
  const auto n = r.get<std::uint64_t>("array length");
  if (elem == kArray) bad_file(path, "nested GGUF arrays are not supported");
  // Every element takes at least its scalar's size (a string its 8-byte
  // length): a longer array is a lie, refused before anything is allocated.
  if (n > r.remaining() / (elem == kString ? 8 : scalar_size(elem, path)))
    bad_file(path, "truncated file (metadata array)");
  if (elem == kString) {
    std::vector<std::string> strings(n);
    for (std::string& s : strings) s = r.get_string("string");
    return strings;
  }
  std::vector<double> numbers(n);
  for (double& x : numbers)
    x = std::visit([](auto v) -> double {
      if constexpr (std::is_arithmetic_v<decltype(v)>) return static_cast<double>(v);
      else return 0.0;
    }, read_value(r, elem, path));
  return numbers;
}

GgufValue read_value(BinaryReader& r, std::uint32_t type, const std::string& path) {
  switch (type) {
    case kU8: return std::uint64_t{r.get<std::uint8_t>("u8")};
    case kI8: return std::int64_t{r.get<std::int8_t>("i8")};
    case kU16: return std::uint64_t{r.get<std::uint16_t>("u16")};
    case kI16: return std::int64_t{r.get<std::int16_t>("i16")};
    case kU32: return std::uint64_t{r.get<std::uint32_t>("u32")};
    case kI32: return std::int64_t{r.get<std::int32_t>("i32")};
    case kU64: return r.get<std::uint64_t>("u64");
    case kI64: return r.get<std::int64_t>("i64");
    case kF32: return double{r.get<float>("f32")};
    case kF64: return r.get<double>("f64");
    case kBool: return std::uint64_t{r.get<std::uint8_t>("bool")};
    case kString: return r.get_string("string");
    case kArray: return read_array(r, path);
    default: bad_file(path, "unknown GGUF metadata type " + std::to_string(type));
  }
}

struct GgufTensor {
  std::vector<std::uint64_t> dims;  // ggml order: dims[0] is the contiguous one
  std::uint32_t type = 0;
  std::uint64_t offset = 0;
};

class GgufFile {
 public:
  GgufFile(const std::vector<char>& bytes, const std::string& path) : bytes_(bytes), path_(path) {
    BinaryReader r({bytes.data(), bytes.size()}, path);
    if (bytes.size() < 4 || std::memcmp(bytes.data(), "GGUF", 4) != 0) bad_file(path, "not a GGUF file (bad magic)");
    r.take(4, "magic");
    const auto version = r.get<std::uint32_t>("version");
    if (version != 2 && version != 3)
      bad_file(path, "unsupported GGUF version " + std::to_string(version) + " (need 2 or 3)");
    const auto n_tensors = r.get<std::uint64_t>("tensor count");
    const auto n_kv = r.get<std::uint64_t>("metadata count");
    // Every entry takes at least 12 bytes: a count above that is a lie.
    if (n_tensors > bytes.size() / 12 || n_kv > bytes.size() / 12) bad_file(path, "implausible GGUF counts");
    for (std::uint64_t i = 0; i < n_kv; ++i) {
      std::string key = r.get_string("string");
      const auto type = r.get<std::uint32_t>("metadata type");
      meta_[std::move(key)] = read_value(r, type, path);
    }
    for (std::uint64_t i = 0; i < n_tensors; ++i) {
      std::string name = r.get_string("string");
      GgufTensor t;
      const auto n_dims = r.get<std::uint32_t>("tensor rank");
      if (n_dims < 1 || n_dims > 4) bad_file(path, "tensor " + name + " has rank " + std::to_string(n_dims));
      for (std::uint32_t d = 0; d < n_dims; ++d) t.dims.push_back(r.get<std::uint64_t>("tensor dims"));
      t.type = r.get<std::uint32_t>("tensor type");
      t.offset = r.get<std::uint64_t>("tensor offset");
      if (!tensors_.emplace(name, std::move(t)).second) bad_file(path, "duplicate tensor " + name);
    }
    const std::uint64_t align = uint_or("general.alignment", 32);
    if (align == 0 || (align & (align - 1)) != 0) bad_file(path, "general.alignment must be a power of two");
    data_ = (r.pos() + align - 1) / align * align;
    if (data_ > bytes.size()) bad_file(path, "truncated file (no tensor data)");
    for (const auto& [name, t] : tensors_)
      if (t.offset % align != 0) bad_file(path, "tensor " + name + " is not aligned to general.alignment");
  }

  std::uint64_t uint_or(const std::string& key, std::uint64_t fallback) const {
    auto it = meta_.find(key);
    if (it == meta_.end()) return fallback;
    if (auto* u = std::get_if<std::uint64_t>(&it->second)) return *u;
    if (auto* i = std::get_if<std::int64_t>(&it->second); i && *i >= 0) return static_cast<std::uint64_t>(*i);
    bad_file(path_, "metadata " + key + " must be a non-negative integer");
  }
  std::uint64_t uint_required(const std::string& key) const {
    if (!meta_.count(key)) bad_file(path_, "missing metadata " + key);
    return uint_or(key, 0);
  }
  double float_or(const std::string& key, double fallback) const {
    auto it = meta_.find(key);
    if (it == meta_.end()) return fallback;
    if (auto* f = std::get_if<double>(&it->second)) return *f;
    bad_file(path_, "metadata " + key + " must be a float");
  }
  std::string string_or(const std::string& key, const std::string& fallback) const {
    auto it = meta_.find(key);
    if (it == meta_.end()) return fallback;
    if (auto* s = std::get_if<std::string>(&it->second)) return *s;
    bad_file(path_, "metadata " + key + " must be a string");
  }
  // An array's values, null when the key is absent.
  template <typename T>
  const std::vector<T>* array_or_null(const std::string& key) const {
    auto it = meta_.find(key);
    if (it == meta_.end()) return nullptr;
    if (auto* a = std::get_if<std::vector<T>>(&it->second)) return a;
    bad_file(path_, "metadata " + key + (std::is_same_v<T, std::string> ? " must be an array of strings"
                                                                         : " must be an array of numbers"));
  }
  bool has_tensor(const std::string& name) const { return tensors_.count(name) != 0; }
  const GgufTensor* find(const std::string& name) const {
    auto it = tensors_.find(name);
    return it == tensors_.end() ? nullptr : &it->second;
  }

  // The tensor as fp32, after checking its shape is [rows, cols] (cols contiguous).
  std::vector<float> matrix(const std::string& name, std::uint64_t rows, std::uint64_t cols) const {
    const GgufTensor* t = find(name);
    if (!t) bad_file(path_, "missing tensor " + name);
    std::vector<std::uint64_t> want = {cols};
    if (rows != 1 || t->dims.size() > 1) want.push_back(rows);
    if (t->dims != want)
      bad_file(path_, "tensor " + name + " has shape " + shape(t->dims) + ", expected " + shape(want));
    const std::optional<GgmlType> type = ggml_type(t->type);
    if (!type)
      bad_file(path_, "tensor " + name + " has ggml type " + ggml_type_name(t->type) + " (" +
                          std::to_string(t->type) + "); the loader decodes F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, "
                          "Q8_0 and Q2_K-Q6_K");
    if (cols % type->block_values != 0)
      bad_file(path_, "tensor " + name + ": rows of " + std::to_string(cols) + " values do not fill " + type->name +
                          " blocks of " + std::to_string(type->block_values));
    const std::uint64_t n = rows * cols, size = n / type->block_values * type->block_bytes;
    if (t->offset > bytes_.size() - data_ || size > bytes_.size() - data_ - t->offset)
      bad_file(path_, "truncated file (tensor " + name + " runs past the end)");
    std::vector<float> out(n);
    dequantize(t->type, reinterpret_cast<const unsigned char*>(bytes_.data() + data_ + t->offset), out.data(), n);
    return out;
  }

 private:
  static std::string shape(const std::vector<std::uint64_t>& dims) {
    std::string s = "[";
    for (std::size_t i = 0; i < dims.size(); ++i) s += (i ? ", " : "") + std::to_string(dims[i]);
    return s + "] (ggml order)";
  }

  const std::vector<char>& bytes_;
  const std::string& path_;
  std::map<std::string, GgufValue> meta_;
  std::map<std::string, GgufTensor> tensors_;
  std::size_t data_ = 0;
};

int checked_int(std::uint64_t value, const std::string& key, const std::string& path) {
  if (value > static_cast<std::uint64_t>(std::numeric_limits<int>::max()))
    bad_file(path, "metadata " + key + " is too large");
  return static_cast<int>(value);
}

// The tokenizer.ggml.* vocabulary: pieces and scores of a "llama"
// (SentencePiece) one, pieces and merges of a "gpt2" (byte-level BPE) one,
// the kind alone of any other.
Weights::Vocabulary read_vocabulary(const GgufFile& f, int vocab_size, const std::string& path) {
  Weights::Vocabulary v;
  v.model = f.string_or("tokenizer.ggml.model", "");
  const bool byte_level = v.model == "gpt2";
  if (v.model != "llama" && !byte_level) return v;
  const auto* tokens = f.array_or_null<std::string>("tokenizer.ggml.tokens");
  const auto* scores = f.array_or_null<double>("tokenizer.ggml.scores");
  const auto* types = f.array_or_null<double>("tokenizer.ggml.token_type");
  if (!tokens || tokens->size() != static_cast<std::size_t>(vocab_size))
    bad_file(path, "tokenizer.ggml.tokens must hold the model's " + std::to_string(vocab_size) + " tokens");
  if ((scores && scores->size() != tokens->size()) || (types && types->size() != tokens->size()))
    bad_file(path, "tokenizer.ggml.scores and token_type must hold one value per token");
  auto id = [&](const char* key, int fallback) {
    constexpr std::uint64_t kAbsent = std::numeric_limits<std::uint64_t>::max();
    const std::uint64_t value = f.uint_or(key, kAbsent);
    return value == kAbsent ? fallback : checked_int(value, key, path);
  };
  // A byte-level vocabulary has no fixed BOS / EOS and adds no BOS unless
  // it says so (llama.cpp's defaults for "gpt2").
  v.bos = id("tokenizer.ggml.bos_token_id", byte_level ? -1 : v.bos);
  v.eos = id("tokenizer.ggml.eos_token_id", byte_level ? -1 : v.eos);
  v.add_bos = f.uint_or("tokenizer.ggml.add_bos_token", byte_level ? 0 : 1) != 0;
  constexpr int kUnknown = 2, kControl = 3;  // llama.cpp's token types
  auto special = [&](std::size_t i) { return types && ((*types)[i] == kUnknown || (*types)[i] == kControl); };
  if (byte_level) {
    const auto* merges = f.array_or_null<std::string>("tokenizer.ggml.merges");
    if (!merges) bad_file(path, "tokenizer.ggml.merges is missing (a 'gpt2' vocabulary needs its merges)");
    v.merges = *merges;
    v.pre = f.string_or("tokenizer.ggml.pre", "default");
    for (std::size_t i = 0; i < tokens->size(); ++i) v.pieces.push_back(special(i) ? std::string() : (*tokens)[i]);
    return v;
  }
  constexpr std::string_view kSpace = "\xe2\x96\x81";  // U+2581, SentencePiece's word boundary
  for (std::size_t i = 0; i < tokens->size(); ++i) {
    const std::string_view text = special(i) ? std::string_view() : std::string_view((*tokens)[i]);
    std::string piece;
    for (std::size_t at = 0; at < text.size();) {
      const bool space = text.substr(at, kSpace.size()) == kSpace;
      piece += space ? ' ' : text[at];
      at += space ? kSpace.size() : 1;
    }
    v.pieces.push_back(std::move(piece));
    v.scores.push_back(scores ? static_cast<float>((*scores)[i]) : 0.0f);
  }
  return v;
}

// GGUF llama tensors load unchanged: llama.cpp's converter already permuted
// HF's half-split Q/K rows for RoPE on adjacent pairs (GGML_ROPE_TYPE_NORM),
// the layout llama2.c uses too.
Weights parse_gguf(const std::vector<char>& bytes, const std::string& path) {
  const GgufFile f(bytes, path);
  const std::string arch = f.string_or("general.architecture", "");
  if (arch != "llama") bad_file(path, "general.architecture is '" + arch + "', only 'llama' is supported");
  Weights w;
  ModelConfig& c = w.config;
  auto get = [&](const char* key) { return checked_int(f.uint_required(key), key, path); };
  c.dim = get("llama.embedding_length");
  c.n_layers = get("llama.block_count");
  c.n_heads = get("llama.attention.head_count");
  c.n_kv_heads = checked_int(f.uint_or("llama.attention.head_count_kv", c.n_heads),
                             "llama.attention.head_count_kv", path);
  c.hidden_dim = get("llama.feed_forward_length");
  c.seq_len = get("llama.context_length");
  c.rope_theta = static_cast<float>(f.float_or("llama.rope.freq_base", 10000.0));
  c.norm_eps = static_cast<float>(f.float_or("llama.attention.layer_norm_rms_epsilon", 1e-5));
  const GgufTensor* embd = f.find("token_embd.weight");
  if (!embd) bad_file(path, "missing tensor token_embd.weight");
  if (embd->dims.size() != 2) bad_file(path, "token_embd.weight must be 2-D");
  c.vocab_size = checked_int(embd->dims[1], "token_embd.weight rows", path);
  if (c.n_heads > 0 && c.dim % c.n_heads == 0 &&
      f.uint_or("llama.rope.dimension_count", static_cast<std::uint64_t>(c.head_dim())) !=
          static_cast<std::uint64_t>(c.head_dim()))
    bad_file(path, "llama.rope.dimension_count must equal the head dimension (partial RoPE is not supported)");
  if (!(c.rope_theta > 0.0f) || !(c.norm_eps > 0.0f)) bad_file(path, "rope freq_base and rms epsilon must be positive");
  // Variants of the llama architecture the engine would run with wrong
  // numbers rather than fail: refused by name.
  if (const std::string scaling = f.string_or("llama.rope.scaling.type", "none"); scaling != "none")
    bad_file(path, "llama.rope.scaling.type '" + scaling + "' is not supported (plain RoPE only)");
  if (f.uint_or("llama.expert_count", 0) > 0) bad_file(path, "mixture-of-experts llama models are not supported");
  try {
    c.validate();
  } catch (const std::runtime_error& e) {
    bad_file(path, std::string("inconsistent GGUF hyperparameters: ") + e.what());
  }

  const std::uint64_t d = c.dim, h = c.hidden_dim, kv = c.kv_dim();
  w.token_embedding = f.matrix("token_embd.weight", c.vocab_size, d);
  for (int l = 0; l < c.n_layers; ++l) {
    const std::string b = "blk." + std::to_string(l) + ".";
    Weights::Layer layer;
    layer.attn_norm = f.matrix(b + "attn_norm.weight", 1, d);
    layer.wq = f.matrix(b + "attn_q.weight", d, d);
    layer.wk = f.matrix(b + "attn_k.weight", kv, d);
    layer.wv = f.matrix(b + "attn_v.weight", kv, d);
    layer.wo = f.matrix(b + "attn_output.weight", d, d);
    layer.ffn_norm = f.matrix(b + "ffn_norm.weight", 1, d);
    layer.w_gate = f.matrix(b + "ffn_gate.weight", h, d);
    layer.w_down = f.matrix(b + "ffn_down.weight", d, h);
    layer.w_up = f.matrix(b + "ffn_up.weight", h, d);
    w.layers.push_back(std::move(layer));
  }
  w.final_norm = f.matrix("output_norm.weight", 1, d);
  if (f.has_tensor("output.weight")) w.classifier = f.matrix("output.weight", c.vocab_size, d);
  if (f.has_tensor("rope_freqs.weight")) {
    w.rope_freq_factors = f.matrix("rope_freqs.weight", 1, static_cast<std::uint64_t>(c.head_dim() / 2));
    for (float factor : w.rope_freq_factors)
      if (!(factor > 0.0f) || !std::isfinite(factor)) bad_file(path, "rope_freqs.weight must be positive and finite");
  }
  w.vocabulary = read_vocabulary(f, c.vocab_size, path);
  return w;
}

}  // namespace

void ModelConfig::validate() const {
  auto need = [](bool ok, const std::string& what) {
    if (!ok) throw std::runtime_error(what);
  };
  need(dim > 0 && hidden_dim > 0 && n_layers > 0 && n_heads > 0 && n_kv_heads > 0 && vocab_size > 0 &&
           seq_len > 0,
       "every dimension must be positive (dim " + std::to_string(dim) + ", hidden " +
           std::to_string(hidden_dim) + ", layers " + std::to_string(n_layers) + ", heads " +
           std::to_string(n_heads) + ", kv heads " + std::to_string(n_kv_heads) + ", vocab " +
           std::to_string(vocab_size) + ", seq_len " + std::to_string(seq_len) + ")");
  need(dim % n_heads == 0, "dim must be a multiple of n_heads");
  need(head_dim() % 2 == 0, "head dimension must be even for RoPE");
  need(n_heads % n_kv_heads == 0, "n_heads must be a multiple of n_kv_heads");
  // Keeps every tensor below 2^31 elements and every product in range.
  constexpr long long kMax = 1LL << 20;
  need(dim <= kMax && hidden_dim <= kMax && vocab_size <= kMax && seq_len <= kMax && n_layers <= 4096,
       "dimensions are implausibly large");
}

Weights load_llama2c(const std::string& path) { return require_finite(parse_llama2c(read_file(path), path), path); }

Weights load_gguf(const std::string& path) { return require_finite(parse_gguf(read_file(path), path), path); }

Weights load_weights(const std::string& path) {
  const std::vector<char> bytes = read_file(path);
  const bool gguf = bytes.size() >= 4 && std::memcmp(bytes.data(), "GGUF", 4) == 0;
  return require_finite(gguf ? parse_gguf(bytes, path) : parse_llama2c(bytes, path), path);
}

}  // namespace attention_echo::llama
