// GPT-2-style byte-level BPE, the tokenizer of GGUF files whose
// tokenizer.ggml.model is "gpt2" (Llama 3, SmolLM, and most models trained
// with Hugging Face's `tokenizers`): the text is split into words by a
// pre-tokenizer (a regular expression, hand-written here as llama.cpp does,
// over ICU's Unicode categories), each word's bytes are written in GPT-2's
// printable byte alphabet and merged by merge rank.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

namespace attention_echo::llama {

// The pre-tokenizers implemented, by their tokenizer.ggml.pre names.
enum class PreTokenizer {
  kGpt2,    // "gpt2": 's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+
  kLlama3,  // "llama-bpe" (Llama 3): case-blind contractions, [^\r\n\p{L}\p{N}]?\p{L}+, \p{N}{1,3},
            // ' ?[^\s\p{L}\p{N}]+[\r\n]*', \s*[\r\n]+, \s+(?!\S), \s+; whole words found in the
            // vocabulary are taken as they are (Hugging Face's ignore_merges)
  kSmolLM,  // "smollm" (also StarCoder's): every digit alone, then "gpt2" on the rest
};
// Throws std::invalid_argument naming `name` when it is not one of the above.
PreTokenizer pre_tokenizer_named(std::string_view name);

// The words of `text` (byte ranges of it, in order, covering it).
std::vector<std::string_view> pre_tokenize(std::string_view text, PreTokenizer pre);

class ByteLevelBpe {
 public:
  // tokens: the vocabulary as stored (in GPT-2's byte alphabet); an empty
  // token is never produced (control tokens). merges: "left right" pairs,
  // highest priority first; a pair whose parts or result are not tokens is
  // skipped. A byte with no token is refused by encode().
  ByteLevelBpe(const std::vector<std::string>& tokens, const std::vector<std::string>& merges, PreTokenizer pre);
  // Throws std::invalid_argument naming a byte of `text` that has no token.
  void encode(std::string_view text, std::vector<int>& out) const;
  // The bytes of `token` (its text as it is where it is not in the byte alphabet).
  std::string decode(int token) const;
  int size() const { return static_cast<int>(tokens_.size()); }

 private:
  void encode_word(std::string_view word, std::vector<int>& out) const;

  struct Merge {
    int rank, token;
  };
  PreTokenizer pre_;
  std::vector<std::string> tokens_;
  std::unordered_map<std::string, int> ids_;               // token text -> id
  std::unordered_map<std::uint64_t, Merge> merges_;        // (left id << 32 | right id) -> merge
  int byte_token_[256];  // -1: no token for that byte
};

}  // namespace attention_echo::llama
