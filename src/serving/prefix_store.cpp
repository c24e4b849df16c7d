// The exact-prefix store: a flat list scanned per lookup. Stores hold a few
// hundred prompts at most, each lookup is dwarfed by the forward it saves.
#include <algorithm>
#include <cstdint>
#include <stdexcept>
#include <vector>

#include "attention_echo/serving.hpp"

namespace attention_echo::serving {

struct PrefixStore::Impl {
  struct Entry {
    std::vector<int> tokens;
    llama::KVState kv;
    bool exact = true;
    std::uint64_t last_use = 0;
    std::size_t bytes = 0;
  };
  std::vector<Entry> entries;
  std::size_t max_bytes = 0;
  std::size_t bytes = 0;
  std::uint64_t clock = 0;

  void evict_to_budget() {
    while (bytes > max_bytes) {
      auto lru = std::min_element(entries.begin(), entries.end(),
                                  [](const Entry& a, const Entry& b) { return a.last_use < b.last_use; });
      bytes -= lru->bytes;
      entries.erase(lru);
    }
  }
};

PrefixStore::PrefixStore(std::size_t max_bytes) : impl_(std::make_unique<Impl>()) { impl_->max_bytes = max_bytes; }
PrefixStore::~PrefixStore() = default;
PrefixStore::PrefixStore(PrefixStore&&) noexcept = default;
PrefixStore& PrefixStore::operator=(PrefixStore&&) noexcept = default;

std::size_t PrefixStore::size() const { return impl_->entries.size(); }

PrefixStore::Match PrefixStore::longest_match(std::span<const int> tokens) {
  Match best;
  Impl::Entry* hit = nullptr;
  for (auto& e : impl_->entries) {
    const std::size_t n = std::min(e.tokens.size(), tokens.size());
    const int shared = static_cast<int>(std::mismatch(e.tokens.begin(), e.tokens.begin() + n, tokens.begin()).first -
                                        e.tokens.begin());
    if (shared > best.length) {
      best = {&e.kv, shared, e.exact};
      hit = &e;
    }
  }
  if (hit) hit->last_use = ++impl_->clock;
  return best;
}

void PrefixStore::insert(std::span<const int> tokens, llama::KVState kv, bool exact) {
  if (static_cast<std::size_t>(kv.length) > tokens.size()) throw std::invalid_argument("kv: longer than tokens");
  Impl::Entry e;
  e.tokens.assign(tokens.begin(), tokens.begin() + kv.length);
  e.bytes = kv.bytes() + e.tokens.size() * sizeof(int);
  e.kv = std::move(kv);
  e.exact = exact;
  e.last_use = ++impl_->clock;
  if (e.bytes > impl_->max_bytes) return;
  impl_->bytes += e.bytes;
  impl_->entries.push_back(std::move(e));
  impl_->evict_to_budget();
}

}  // namespace attention_echo::serving
