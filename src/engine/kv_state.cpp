// KVState's pages: grown as the sequence grows, shared by copies, prefixes
// and the serving store, copied only when written while shared.
#include <algorithm>
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
  if (!pages.empty() && (layers != model_layers || kv_dim != model_kv_dim)) {
    throw std::invalid_argument("kv: pages of " + std::to_string(layers) + " layers x " + std::to_string(kv_dim) +
                                " values, the model needs " + std::to_string(model_layers) + " x " +
                                std::to_string(model_kv_dim));
  }
  const std::size_t page_floats = std::size_t{2} * model_layers * page_tokens * model_kv_dim;
  if (pool && pool->page_floats() != page_floats)
    throw std::invalid_argument("kv: the pool's pages hold " + std::to_string(pool->page_floats()) +
                                " values, this state's " + std::to_string(page_floats));
  if (pages.empty()) {
    layers = model_layers;
    kv_dim = model_kv_dim;
  }
  for (int p = t0 / page_tokens; p * page_tokens < t1; ++p) {
    if (p == static_cast<int>(pages.size())) {
      pages.push_back(pool ? pool->zeroed() : std::make_shared<KVPage>(KVPage{std::vector<float>(page_floats)}));
    } else if (pages[p].use_count() > 1) {
      // Held elsewhere too (the store, a copy of this state): frozen, so
      // this state writes into a copy of its own. A count of 1 cannot rise
      // behind our back: a new holder can only copy this very pointer.
      pages[p] = pool ? pool->copy(*pages[p]) : std::make_shared<KVPage>(*pages[p]);
    }
  }
  // Every page is made non-const (make_shared<KVPage>, or the pool's new
  // KVPage) and is now this state's alone, so writable_k/v writing through
  // it is defined.
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

KVPagePool::KVPagePool(std::size_t page_floats) : page_floats_(page_floats) {
  if (page_floats == 0) throw std::invalid_argument("page_floats: must be positive");
}

std::vector<float> KVPagePool::take() {
  std::lock_guard lock(mutex_);
  if (free_.empty()) return {};
  std::vector<float> data = std::move(free_.back());
  free_.pop_back();
  return data;
}

// The page's buffer goes back to the free list when its last holder drops
// it, if the pool is still there.
std::shared_ptr<KVPage> KVPagePool::wrap(std::vector<float> data) {
  return std::shared_ptr<KVPage>(new KVPage{std::move(data)}, [pool = weak_from_this()](KVPage* page) {
    if (const auto owner = pool.lock()) {
      std::lock_guard lock(owner->mutex_);
      owner->free_.push_back(std::move(page->data));
    }
    delete page;
  });
}

std::shared_ptr<KVPage> KVPagePool::zeroed() {
  std::vector<float> data = take();
  if (data.empty()) return wrap(std::vector<float>(page_floats_));
  std::fill(data.begin(), data.end(), 0.0f);
  return wrap(std::move(data));
}

std::shared_ptr<KVPage> KVPagePool::copy(const KVPage& page) {
  if (page.data.size() != page_floats_) throw std::invalid_argument("page: not of this pool's size");
  std::vector<float> data = take();
  if (data.empty()) return wrap(page.data);
  std::copy(page.data.begin(), page.data.end(), data.begin());
  return wrap(std::move(data));
}

void KVPagePool::reserve(std::size_t pages) {
  while (free_pages() < pages) {
    std::vector<float> data(page_floats_);  // value-initialised: every page written
    std::lock_guard lock(mutex_);
    free_.push_back(std::move(data));
  }
}

std::size_t KVPagePool::free_pages() const {
  std::lock_guard lock(mutex_);
  return free_.size();
}

}  // namespace attention_echo::llama
