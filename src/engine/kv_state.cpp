// KVState's pages: grown as the sequence grows, shared by copies, prefixes
// and the serving store, copied only when written while shared.
#include <stdexcept>
#include <string>

#include "attention_echo/llama.hpp"
#include "attention_echo/tensor.hpp"

namespace attention_echo::llama {

void KVState::make_writable(int t0, int t1, int model_layers, int model_kv_dim) {
  if (page_tokens <= 0 || page_tokens % kKeyChunk != 0)
    throw std::invalid_argument("kv: page_tokens must be a positive multiple of " + std::to_string(kKeyChunk) +
                                ", got " + std::to_string(page_tokens));
  if (t0 > static_cast<int>(pages.size()) * page_tokens) throw std::invalid_argument("kv: missing rows before t0");
  if (pages.empty()) {
    layers = model_layers;
    kv_dim = model_kv_dim;
  } else if (layers != model_layers || kv_dim != model_kv_dim) {
    throw std::invalid_argument("kv: pages of " + std::to_string(layers) + " layers x " + std::to_string(kv_dim) +
                                " values, the model needs " + std::to_string(model_layers) + " x " +
                                std::to_string(model_kv_dim));
  }
  const std::size_t page_floats = std::size_t{2} * layers * page_tokens * kv_dim;
  for (int p = t0 / page_tokens; p * page_tokens < t1; ++p) {
    if (p == static_cast<int>(pages.size())) {
      pages.push_back(std::make_shared<KVPage>(KVPage{std::vector<float>(page_floats)}));
    } else if (pages[p].use_count() > 1) {
      // Held elsewhere too (the store, a copy of this state): frozen, so
      // this state writes into a copy of its own. A count of 1 cannot rise
      // behind our back: a new holder can only copy this very pointer.
      pages[p] = std::make_shared<KVPage>(*pages[p]);
    }
  }
  // Every page is made non-const (make_shared<KVPage>) and is now this
  // state's alone, so writable_k/v writing through it is defined.
}

KVState KVState::prefix(int tokens) const {
  if (tokens < 0 || tokens > length) throw std::invalid_argument("tokens: prefix longer than the state");
  KVState out = *this;
  out.length = tokens;
  out.pages.resize(tokens == 0 ? 0 : static_cast<std::size_t>((tokens - 1) / page_tokens + 1));
  return out;
}

std::size_t KVState::bytes() const {
  std::size_t n = 0;
  for (const auto& page : pages) n += page->data.size() * sizeof(float);
  return n;
}

}  // namespace attention_echo::llama
