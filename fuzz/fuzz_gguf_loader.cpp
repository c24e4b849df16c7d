// The GGUF loader: load_gguf must throw std::runtime_error naming the file
// or return weights whose sizes agree with their config; a small model that
// loads is run for two tokens (see fuzz_run_model.hpp), and a vocabulary it
// carries becomes a tokenizer (or std::invalid_argument) that encodes text.
#include <cstdint>
#include <stdexcept>

#include "attention_echo/llama.hpp"
#include "fuzz_input_file.hpp"
#include "fuzz_run_model.hpp"

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  namespace llama = attention_echo::llama;
  llama::Weights weights;
  try {
    weights = llama::load_gguf(attention_echo::fuzzing::write_input(data, size));
  } catch (const std::runtime_error&) {
    return 0;
  }
  attention_echo::fuzzing::run_if_small(weights);
  if (weights.vocabulary.pieces.empty()) return 0;
  try {
    const llama::Tokenizer tokenizer(weights.vocabulary);
    for (int id : tokenizer.encode("the theory, A\xc3\xa9 42 \xff\r\n  x's")) tokenizer.decode(-1, id);
  } catch (const std::invalid_argument&) {
  }
  return 0;
}
