// llama2.c tokenizer: same pieces, same merge order as run.c's encode(), but
// the merges come from a heap instead of a rescan, so encoding a long
// document is O(n log n) rather than O(n^2).
#include <algorithm>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <optional>
#include <queue>
#include <stdexcept>

#include "attention_echo/llama.hpp"
#include "engine/byte_level_bpe.hpp"

namespace attention_echo::llama {

namespace {

// A piece of the text being encoded: a node of a doubly linked list over
// the text's code points, merged pairwise into longer pieces.
struct Symbol {
  int token;
  int prev, next;
  std::size_t begin, end;  // byte range in the source text
};

}  // namespace

struct Tokenizer::Impl {
  std::optional<ByteLevelBpe> byte_level;  // a "gpt2" vocabulary; the rest is SentencePiece's
  int bos = kBos, eos = kEos;
  bool add_bos = true;
  std::vector<std::string> pieces;  // SentencePiece's (byte_level holds its own)
  std::vector<float> scores;
  std::vector<int> sorted;  // ids ordered by piece, for lookup
  int byte_token[256];      // -1: no token for that byte
  bool has_merges = false;  // some piece spans several bytes

  int lookup(std::string_view piece) const {
    auto it = std::lower_bound(sorted.begin(), sorted.end(), piece,
                               [&](int id, std::string_view p) { return std::string_view(pieces[id]) < p; });
    return it != sorted.end() && pieces[*it] == piece ? *it : -1;
  }

  // One symbol per code point of `source` that has a piece, else one per
  // byte (byte-fallback pieces), linked in order.
  std::vector<Symbol> initial_symbols(const std::string& source) const {
    std::vector<Symbol> symbols;
    for (std::size_t i = 0; i < source.size();) {
      // One UTF-8 code point: a lead byte and up to three continuation bytes.
      std::size_t n = 1;
      while (n < 4 && i + n < source.size() && (static_cast<unsigned char>(source[i + n]) & 0xC0) == 0x80) ++n;
      const int id = lookup(std::string_view(source).substr(i, n));
      if (id >= 0) {
        symbols.push_back({id, 0, 0, i, i + n});
      } else {
        for (std::size_t b = i; b < i + n; ++b) {
          const int byte_id = byte_token[static_cast<unsigned char>(source[b])];
          if (byte_id < 0)
            throw std::invalid_argument("text: byte " + std::to_string(static_cast<unsigned char>(source[b])) +
                                        " has no token in this vocabulary");
          symbols.push_back({byte_id, 0, 0, b, b + 1});
        }
      }
      i += n;
    }
    const int n = static_cast<int>(symbols.size());
    for (int i = 0; i < n; ++i) {
      symbols[i].prev = i - 1;
      symbols[i].next = i + 1 < n ? i + 1 : -1;
    }
    return symbols;
  }

  // Merges neighbours into the pieces they spell, best score first,
  // leftmost first on ties (run.c's order). A candidate is stale once
  // either symbol merged with something else.
  void merge(std::vector<Symbol>& symbols, const std::string& source) const {
    struct Pair {
      float score;
      std::size_t begin;  // of the left symbol: the tie-break
      int left, right, token;
      std::size_t left_end, right_end;
      bool operator<(const Pair& o) const { return score != o.score ? score < o.score : begin > o.begin; }
    };
    const int n = static_cast<int>(symbols.size());
    std::priority_queue<Pair> heap;
    std::vector<bool> dead(n, false);
    auto consider = [&](int left) {
      if (left < 0 || symbols[left].next < 0) return;
      const Symbol& a = symbols[left];
      const Symbol& b = symbols[a.next];
      const int id = lookup(std::string_view(source).substr(a.begin, b.end - a.begin));
      if (id >= 0) heap.push({scores[id], a.begin, left, a.next, id, a.end, b.end});
    };
    for (int i = 0; i < n; ++i) consider(i);
    while (!heap.empty()) {
      const Pair p = heap.top();
      heap.pop();
      Symbol& a = symbols[p.left];
      const Symbol& b = symbols[p.right];
      if (dead[p.left] || dead[p.right] || a.next != p.right || a.end != p.left_end || b.end != p.right_end)
        continue;
      a.token = p.token;
      a.end = b.end;
      a.next = b.next;
      if (b.next >= 0) symbols[b.next].prev = p.left;
      dead[p.right] = true;
      consider(a.prev);
      consider(p.left);
    }
  }

  // Lookup tables over the pieces, built once they are read.
  void index() {
    const int vocab_size = static_cast<int>(pieces.size());
    // Ids sorted by piece for binary search; stable so a duplicated piece
    // resolves to its first id.
    sorted.resize(vocab_size);
    for (int i = 0; i < vocab_size; ++i) sorted[i] = i;
    std::stable_sort(sorted.begin(), sorted.end(), [&](int a, int b) { return pieces[a] < pieces[b]; });
    for (int b = 0; b < 256; ++b) {
      char hex[8];
      std::snprintf(hex, sizeof hex, "<0x%02X>", b);
      int id = lookup(hex);
      if (id < 0) id = lookup(std::string(1, static_cast<char>(b)));
      byte_token[b] = id;
    }
    // Specials (<unk>, BOS, EOS) and byte tokens aside, is any piece longer
    // than one byte?
    for (int i = 3; i < vocab_size && !has_merges; ++i)
      has_merges = pieces[i].size() > 1 && std::find(byte_token, byte_token + 256, i) == byte_token + 256;
  }
};

Tokenizer::~Tokenizer() = default;
Tokenizer::Tokenizer(Tokenizer&&) noexcept = default;
Tokenizer& Tokenizer::operator=(Tokenizer&&) noexcept = default;

int Tokenizer::vocab_size() const {
  return impl_->byte_level ? impl_->byte_level->size() : static_cast<int>(impl_->pieces.size());
}

std::vector<int> Tokenizer::encode(std::string_view text) const {
  return encode(text, {.bos = impl_->add_bos, .eos = false, .dummy_prefix = impl_->has_merges});
}

int Tokenizer::bos() const { return impl_->bos; }
int Tokenizer::eos() const { return impl_->eos; }

Tokenizer::Tokenizer(const std::string& path, int vocab_size) : impl_(std::make_unique<Impl>()) {
  Impl& t = *impl_;
  // encode emits BOS (1) and EOS (2): a smaller vocabulary would give ids
  // outside it (found by fuzz_tokenizer).
  if (vocab_size < 3)
    throw std::invalid_argument("vocab_size must be at least 3 (<unk>, BOS, EOS), got " + std::to_string(vocab_size));
  std::ifstream in(path, std::ios::binary | std::ios::ate);
  if (!in) throw std::runtime_error(path + ": cannot open tokenizer");
  const std::streamoff size = in.tellg();
  in.seekg(0);
  auto fail = [&](const std::string& what) { throw std::runtime_error(path + ": " + what); };
  std::int32_t max_len = 0;
  if (!in.read(reinterpret_cast<char*>(&max_len), 4) || max_len <= 0) fail("bad tokenizer header");
  t.pieces.resize(vocab_size);
  t.scores.resize(vocab_size);
  for (int i = 0; i < vocab_size; ++i) {
    std::int32_t len = 0;
    if (!in.read(reinterpret_cast<char*>(&t.scores[i]), 4) || !in.read(reinterpret_cast<char*>(&len), 4))
      fail("truncated tokenizer (token " + std::to_string(i) + " of " + std::to_string(vocab_size) + ")");
    if (len < 0 || len > max_len) fail("token " + std::to_string(i) + " has bad length " + std::to_string(len));
    // Checked against the bytes left before allocating: a lying length is
    // a truncated file, not a gigabyte allocation (found by fuzz_tokenizer).
    if (len > size - in.tellg())
      fail("token " + std::to_string(i) + " length " + std::to_string(len) + " runs past the end of the file");
    t.pieces[i].resize(len);
    if (!in.read(t.pieces[i].data(), len)) fail("truncated tokenizer (token " + std::to_string(i) + ")");
  }
  if (in.peek() != std::char_traits<char>::eof())
    fail("tokenizer has more than the model's " + std::to_string(vocab_size) + " tokens");
  t.index();
}

Tokenizer::Tokenizer(const Weights::Vocabulary& vocabulary) : impl_(std::make_unique<Impl>()) {
  if (vocabulary.model == "gpt2") {
    const int n = static_cast<int>(vocabulary.pieces.size());
    for (const auto& [name, id] : {std::pair{"BOS", vocabulary.bos}, std::pair{"EOS", vocabulary.eos}})
      if (id < -1 || id >= n)
        throw std::invalid_argument(std::string("vocabulary: ") + name + " id " + std::to_string(id) +
                                    " is outside the " + std::to_string(n) + " tokens");
    impl_->byte_level.emplace(vocabulary.pieces, vocabulary.merges, pre_tokenizer_named(vocabulary.pre));
    impl_->bos = vocabulary.bos;
    impl_->eos = vocabulary.eos;
    impl_->add_bos = vocabulary.add_bos && vocabulary.bos >= 0;
    return;
  }
  if (vocabulary.model != "llama")
    throw std::invalid_argument("vocabulary: a '" + vocabulary.model +
                                "' tokenizer; SentencePiece ('llama') and byte-level BPE ('gpt2') are implemented");
  if (vocabulary.pieces.size() < 3)
    throw std::invalid_argument("vocabulary: needs at least 3 pieces (<unk>, BOS, EOS)");
  if (vocabulary.scores.size() != vocabulary.pieces.size())
    throw std::invalid_argument("vocabulary: one score per piece needed");
  if (vocabulary.bos != kBos || vocabulary.eos != kEos)
    throw std::invalid_argument("vocabulary: BOS / EOS are " + std::to_string(vocabulary.bos) + " / " +
                                std::to_string(vocabulary.eos) + "; the tokenizer writes " + std::to_string(kBos) +
                                " / " + std::to_string(kEos));
  impl_->pieces = vocabulary.pieces;
  impl_->scores = vocabulary.scores;
  impl_->index();
}

std::vector<int> Tokenizer::encode(std::string_view text, const EncodeOptions& options) const {
  const Impl& t = *impl_;
  std::vector<int> tokens;
  if (t.byte_level) {
    if (options.bos && t.bos >= 0) tokens.push_back(t.bos);
    t.byte_level->encode(text, tokens);
    if (options.eos && t.eos >= 0) tokens.push_back(t.eos);
    return tokens;
  }
  std::string source;
  if (options.dummy_prefix && !text.empty()) source = " ";
  source += text;
  std::vector<Symbol> symbols = t.initial_symbols(source);
  t.merge(symbols, source);
  if (options.bos) tokens.push_back(kBos);
  for (int i = symbols.empty() ? -1 : 0; i >= 0; i = symbols[i].next) tokens.push_back(symbols[i].token);
  if (options.eos) tokens.push_back(kEos);
  return tokens;
}

std::string Tokenizer::decode(int previous, int token) const {
  if (token < 0 || token >= vocab_size()) throw std::invalid_argument("token: id " + std::to_string(token) + " is out of range");
  if (impl_->byte_level) return impl_->byte_level->decode(token);
  std::string_view piece = impl_->pieces[token];
  if (previous == kBos && !piece.empty() && piece[0] == ' ') piece.remove_prefix(1);
  unsigned byte = 0;
  if (piece.size() == 6 && std::sscanf(std::string(piece).c_str(), "<0x%02X>", &byte) == 1)
    return std::string(1, static_cast<char>(byte));
  return std::string(piece);
}

Tokenizer model_tokenizer(const Weights& weights, const std::string& model_path, const std::string& tokenizer_path) {
  if (!tokenizer_path.empty()) return Tokenizer(tokenizer_path, weights.config.vocab_size);
  if (!weights.vocabulary.pieces.empty()) return Tokenizer(weights.vocabulary);
  if (!weights.vocabulary.model.empty())
    throw std::invalid_argument("tokenizer: " + model_path + " carries a '" + weights.vocabulary.model +
                                "' tokenizer, which is not implemented ('llama' and 'gpt2' are): give a llama2.c "
                                "tokenizer.bin");
  return Tokenizer((std::filesystem::path(model_path).parent_path() / "tokenizer.bin").string(),
                   weights.config.vocab_size);
}

}  // namespace attention_echo::llama
