// The llama2.c tokenizer: input = u16 vocabulary size, u8 text length, the
// text, then the tokenizer.bin bytes. Construction must throw (std::
// runtime_error for a bad file) or give a tokenizer whose encode returns ids
// in the vocabulary, each of which decodes.
#include <cstdint>
#include <cstdlib>
#include <stdexcept>
#include <string>

#include "attention_echo/llama.hpp"
#include "fuzz_input_file.hpp"

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  namespace llama = attention_echo::llama;
  if (size < 3) return 0;
  const int vocab = 1 + (data[0] | data[1] << 8) % 1024;
  const std::size_t text_size = std::min<std::size_t>(data[2], size - 3);
  const std::string text(reinterpret_cast<const char*>(data + 3), text_size);
  const std::uint8_t* file = data + 3 + text_size;
  const std::string& path = attention_echo::fuzzing::write_input(file, size - 3 - text_size);
  try {
    const llama::Tokenizer tokenizer(path, vocab);
    const std::vector<int> ids = tokenizer.encode(text);
    int previous = llama::Tokenizer::kBos;
    for (int id : ids) {
      if (id < 0 || id >= vocab) std::abort();
      tokenizer.decode(previous, id);
      previous = id;
    }
  } catch (const std::runtime_error&) {
  }
  return 0;
}
