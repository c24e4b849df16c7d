#include "engine/byte_level_bpe.hpp"

#include <unicode/uchar.h>
#include <unicode/utf8.h>

#include <algorithm>
#include <queue>
#include <stdexcept>

namespace attention_echo::llama {

namespace {

// A code point of the text as the pre-tokenizer's classes see it. Bytes
// that are not UTF-8 are code points of class kOther, one byte each; kEnd
// is what lies past the text (or the segment being split).
enum class Class : std::uint8_t { kLetter, kNumber, kSpace, kOther, kEnd };
struct CodePoint {
  std::int32_t value;
  std::uint32_t begin;  // byte offset in the text
  Class cls;
};

Class classify(UChar32 c) {
  // \s as the pattern engines read it: White_Space (Zs, Zl, Zp, \t-\r, U+0085).
  if (u_isUWhiteSpace(c)) return Class::kSpace;
  const std::uint32_t mask = U_GET_GC_MASK(c);
  if (mask & U_GC_L_MASK) return Class::kLetter;
  if (mask & U_GC_N_MASK) return Class::kNumber;
  return Class::kOther;
}

std::vector<CodePoint> code_points(std::string_view text) {
  std::vector<CodePoint> out;
  const auto* s = reinterpret_cast<const std::uint8_t*>(text.data());
  const auto n = static_cast<std::int32_t>(text.size());
  for (std::int32_t i = 0; i < n;) {
    const std::int32_t begin = i;
    UChar32 c;
    U8_NEXT(s, i, n, c);
    if (c < 0) {  // not UTF-8: this byte alone
      i = begin + 1;
      out.push_back({-1, static_cast<std::uint32_t>(begin), Class::kOther});
    } else {
      out.push_back({c, static_cast<std::uint32_t>(begin), classify(c)});
    }
  }
  return out;
}

// One pattern's match at position i of cps[0, n) (each returns its length
// in code points, at least 1: every pattern here ends in alternatives that
// match any code point).
class Matcher {
 public:
  Matcher(const std::vector<CodePoint>& cps, std::size_t first, std::size_t last)
      : cps_(cps), first_(first), last_(last) {}

  std::size_t gpt2(std::size_t i) const {
    if (std::size_t c = contraction(i, false)) return c;
    const std::size_t j = i + (is(i, ' ') ? 1 : 0);
    for (Class run : {Class::kLetter, Class::kNumber, Class::kOther})
      if (cls(j) == run) return run_end(j, run) - i;
    return spaces(i);
  }

  std::size_t llama3(std::size_t i) const {
    if (std::size_t c = contraction(i, true)) return c;
    if (cls(i) == Class::kLetter) return run_end(i, Class::kLetter) - i;
    if (cls(i) != Class::kNumber && !newline(i) && cls(i + 1) == Class::kLetter)
      return run_end(i + 1, Class::kLetter) - i;
    if (cls(i) == Class::kNumber) return std::min(run_end(i, Class::kNumber), i + 3) - i;
    const std::size_t j = i + (is(i, ' ') ? 1 : 0);
    if (cls(j) == Class::kOther) {
      std::size_t end = run_end(j, Class::kOther);
      while (newline(end)) ++end;
      return end - i;
    }
    // \s*[\r\n]+: to the last newline of the whitespace run.
    const std::size_t end = run_end(i, Class::kSpace);
    for (std::size_t k = end; k > i; --k)
      if (newline(k - 1)) return k - i;
    return spaces(i);
  }

 private:
  bool in(std::size_t i) const { return i >= first_ && i < last_; }
  Class cls(std::size_t i) const { return in(i) ? cps_[i].cls : Class::kEnd; }
  bool is(std::size_t i, char c) const { return in(i) && cps_[i].value == c; }
  bool newline(std::size_t i) const { return is(i, '\r') || is(i, '\n'); }
  bool is_letter(std::size_t i, char lower, bool any_case) const {
    return is(i, lower) || (any_case && is(i, static_cast<char>(lower - 'a' + 'A')));
  }
  std::size_t run_end(std::size_t i, Class c) const {
    while (in(i) && cps_[i].cls == c) ++i;
    return i;
  }
  // 's 't 're 've 'm 'll 'd
  std::size_t contraction(std::size_t i, bool any_case) const {
    if (!is(i, '\'')) return 0;
    for (char c : {'s', 't', 'm', 'd'})
      if (is_letter(i + 1, c, any_case)) return 2;
    for (const char* pair : {"re", "ve", "ll"})
      if (is_letter(i + 1, pair[0], any_case) && is_letter(i + 2, pair[1], any_case)) return 3;
    return 0;
  }
  // \s+(?!\S)|\s+ at a whitespace run (the run but its last code point when
  // something other than whitespace follows and that leaves one); any other
  // code point alone.
  std::size_t spaces(std::size_t i) const {
    if (cls(i) != Class::kSpace) return 1;
    const std::size_t end = run_end(i, Class::kSpace);
    return end < last_ && end - i >= 2 ? end - i - 1 : end - i;
  }

  const std::vector<CodePoint>& cps_;
  std::size_t first_, last_;
};

// GPT-2's printable alphabet: bytes that are printable Latin-1 stand for
// themselves, the others for U+0100 on, in byte order.
struct ByteAlphabet {
  std::string of[256];
  ByteAlphabet() {
    int next = 256;
    for (int b = 0; b < 256; ++b) {
      const bool printable = (b >= 0x21 && b <= 0x7E) || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE);
      const int cp = printable ? b : next++;
      char buf[4];
      std::int32_t len = 0;
      U8_APPEND_UNSAFE(buf, len, cp);
      of[b].assign(buf, static_cast<std::size_t>(len));
    }
  }
};
const ByteAlphabet& byte_alphabet() {
  static const ByteAlphabet alphabet;
  return alphabet;
}

}  // namespace

PreTokenizer pre_tokenizer_named(std::string_view name) {
  if (name == "gpt2") return PreTokenizer::kGpt2;
  if (name == "llama-bpe") return PreTokenizer::kLlama3;
  if (name == "smollm" || name == "starcoder") return PreTokenizer::kSmolLM;
  throw std::invalid_argument("vocabulary: pre-tokenizer '" + std::string(name) +
                              "' is not implemented (gpt2, llama-bpe, smollm and starcoder are)");
}

std::vector<std::string_view> pre_tokenize(std::string_view text, PreTokenizer pre) {
  const std::vector<CodePoint> cps = code_points(text);
  std::vector<std::string_view> words;
  auto word = [&](std::size_t from, std::size_t to) {
    const std::size_t end = to < cps.size() ? cps[to].begin : text.size();
    words.push_back(text.substr(cps[from].begin, end - cps[from].begin));
  };
  // Each pattern runs over a segment on its own (what is past the segment
  // is neither matched nor looked ahead at).
  auto split = [&](std::size_t first, std::size_t last) {
    const Matcher m(cps, first, last);
    for (std::size_t i = first; i < last;) {
      const std::size_t n = pre == PreTokenizer::kLlama3 ? m.llama3(i) : m.gpt2(i);
      word(i, i + n);
      i += n;
    }
  };
  if (pre != PreTokenizer::kSmolLM) {
    split(0, cps.size());
    return words;
  }
  std::size_t start = 0;
  for (std::size_t i = 0; i < cps.size(); ++i) {
    if (cps[i].cls != Class::kNumber) continue;
    split(start, i);
    word(i, i + 1);
    start = i + 1;
  }
  split(start, cps.size());
  return words;
}

ByteLevelBpe::ByteLevelBpe(const std::vector<std::string>& tokens, const std::vector<std::string>& merges,
                           PreTokenizer pre)
    : pre_(pre), tokens_(tokens) {
  for (std::size_t i = 0; i < tokens.size(); ++i)
    if (!tokens[i].empty()) ids_.try_emplace(tokens[i], static_cast<int>(i));  // the first of duplicates
  const ByteAlphabet& alphabet = byte_alphabet();
  // Some vocabularies leave out bytes valid UTF-8 text never holds (SmolLM2's
  // lacks 192, 193, 245-255 and a few control bytes): such a byte is refused
  // when a text holds it, not when the model loads.
  for (int b = 0; b < 256; ++b) {
    const auto it = ids_.find(alphabet.of[b]);
    byte_token_[b] = it == ids_.end() ? -1 : it->second;
  }
  for (std::size_t rank = 0; rank < merges.size(); ++rank) {
    const std::string& m = merges[rank];
    const std::size_t space = m.find(' ', 1);  // a part may be a single space-like letter, never empty
    if (space == std::string::npos) continue;
    const auto left = ids_.find(m.substr(0, space)), right = ids_.find(m.substr(space + 1));
    const auto merged = ids_.find(m.substr(0, space) + m.substr(space + 1));
    if (left == ids_.end() || right == ids_.end() || merged == ids_.end()) continue;
    const std::uint64_t key = std::uint64_t(std::uint32_t(left->second)) << 32 | std::uint32_t(right->second);
    merges_.try_emplace(key, Merge{static_cast<int>(rank), merged->second});  // the first rank wins
  }
}

void ByteLevelBpe::encode(std::string_view text, std::vector<int>& out) const {
  for (std::string_view word : pre_tokenize(text, pre_)) encode_word(word, out);
}

void ByteLevelBpe::encode_word(std::string_view word, std::vector<int>& out) const {
  if (pre_ == PreTokenizer::kLlama3) {  // ignore_merges: a word that is a token is that token
    std::string mapped;
    for (char c : word) mapped += byte_alphabet().of[static_cast<unsigned char>(c)];
    if (const auto it = ids_.find(mapped); it != ids_.end()) {
      out.push_back(it->second);
      return;
    }
  }
  // Symbols as a linked list over the word's bytes; candidate merges in a
  // heap, lowest rank first, leftmost first on ties (Hugging Face's order).
  struct Symbol {
    int token, prev, next;
  };
  const int n = static_cast<int>(word.size());
  std::vector<Symbol> symbols(n);
  for (int i = 0; i < n; ++i) {
    const auto byte = static_cast<unsigned char>(word[i]);
    if (byte_token_[byte] < 0)
      throw std::invalid_argument("text: byte " + std::to_string(byte) + " has no token in this vocabulary");
    symbols[i] = {byte_token_[byte], i - 1, i + 1 < n ? i + 1 : -1};
  }
  struct Pair {
    int rank, left, right, left_token, right_token;
    bool operator<(const Pair& o) const { return rank != o.rank ? rank > o.rank : left > o.left; }
  };
  std::priority_queue<Pair> heap;
  auto consider = [&](int left) {
    if (left < 0 || symbols[left].next < 0) return;
    const Symbol& a = symbols[left];
    const Symbol& b = symbols[a.next];
    const auto it = merges_.find(std::uint64_t(std::uint32_t(a.token)) << 32 | std::uint32_t(b.token));
    if (it != merges_.end()) heap.push({it->second.rank, left, a.next, a.token, b.token});
  };
  for (int i = 0; i < n; ++i) consider(i);
  while (!heap.empty()) {
    const Pair p = heap.top();
    heap.pop();
    Symbol& a = symbols[p.left];
    // Stale: either side merged with something else since.
    if (a.token != p.left_token || a.next != p.right || symbols[p.right].token != p.right_token) continue;
    const Symbol& b = symbols[p.right];
    a.token = merges_.at(std::uint64_t(std::uint32_t(p.left_token)) << 32 | std::uint32_t(p.right_token)).token;
    a.next = b.next;
    if (b.next >= 0) symbols[b.next].prev = p.left;
    symbols[p.right].token = -1;
    consider(a.prev);
    consider(p.left);
  }
  for (int i = n > 0 ? 0 : -1; i >= 0; i = symbols[i].next) out.push_back(symbols[i].token);
}

std::string ByteLevelBpe::decode(int token) const {
  const std::string_view text = tokens_.at(static_cast<std::size_t>(token));
  const std::vector<CodePoint> cps = code_points(text);
  const auto& of = byte_alphabet().of;
  std::string out;
  for (std::size_t i = 0; i < cps.size(); ++i) {
    const std::size_t end = i + 1 < cps.size() ? cps[i + 1].begin : text.size();
    const std::string_view piece = text.substr(cps[i].begin, end - cps[i].begin);
    const auto byte = std::find(std::begin(of), std::end(of), piece);
    if (byte != std::end(of))
      out += static_cast<char>(byte - std::begin(of));
    else
      out += piece;  // not in the byte alphabet: an added token's own text
  }
  return out;
}

}  // namespace attention_echo::llama
