#include "cache/entry_store.hpp"

#include <algorithm>
#include <functional>

namespace attention_echo::cache {
namespace {

std::uint64_t mix(std::uint64_t h, std::uint64_t x) {
  h ^= x + 0x9e3779b97f4a7c15ULL + (h << 6) + (h >> 2);
  return h;
}

}  // namespace

std::uint64_t EntryStore::exact_hash(const KeySpace& space, std::span<const std::int32_t> tokens) const {
  std::uint64_t h = std::hash<std::string>{}(space.name_space);
  for (int field : {space.layer, space.heads, space.kv_heads, space.dim, int(space.causal),
                    int(space.device.kind), space.device.index, int(space.dtype)})
    h = mix(h, static_cast<std::uint64_t>(field));
  for (std::int32_t t : tokens) h = mix(h, static_cast<std::uint32_t>(t));
  return mix(h, tokens.size());
}

EntryStore::OrderKey EntryStore::order_key(const Entry& e) const {
  // LRU: least recently used first. LFU: fewest uses first, ties by recency.
  return {policy_ == EvictionPolicy::kLfu ? e.uses : 0, e.last_used, e.id};
}

const Entry* EntryStore::get(std::uint64_t id) const {
  auto it = entries_.find(id);
  return it == entries_.end() ? nullptr : &it->second;
}

const Entry* EntryStore::find_exact(const KeySpace& space, std::span<const std::int32_t> tokens) const {
  auto it = exact_.find(exact_hash(space, tokens));
  if (it == exact_.end()) return nullptr;
  const Entry* e = get(it->second);
  // The hash may collide: the entry must match exactly.
  if (e == nullptr || e->space != space || !std::ranges::equal(e->tokens, tokens)) return nullptr;
  return e;
}

std::vector<index::Candidate> EntryStore::find_similar(const KeySpace& space, std::span<const float> key,
                                                       int k, float min_similarity) const {
  auto it = semantic_.find(space);
  if (it == semantic_.end()) return {};
  return it->second.search(key, k, min_similarity);
}

void EntryStore::touch(std::uint64_t id) {
  auto it = entries_.find(id);
  if (it == entries_.end()) return;
  order_.erase(order_key(it->second));
  it->second.last_used = ++tick_;
  ++it->second.uses;
  order_.insert(order_key(it->second));
}

void EntryStore::remove(std::uint64_t id) {
  auto it = entries_.find(id);
  if (it == entries_.end()) return;
  const Entry& e = it->second;
  order_.erase(order_key(e));
  if (!e.tokens.empty()) {
    auto ex = exact_.find(exact_hash(e.space, e.tokens));
    if (ex != exact_.end() && ex->second == id) exact_.erase(ex);
  }
  if (!e.key.empty()) {
    auto sem = semantic_.find(e.space);
    sem->second.remove(id);
    if (sem->second.size() == 0) semantic_.erase(sem);
  }
  bytes_ -= e.host_bytes();
  if (!e.on_host() && (device_bytes_[e.space.device] -= e.device_bytes()) == 0) device_bytes_.erase(e.space.device);
  auto used = usage_.find(e.space.name_space);
  used->second.bytes -= e.bytes();
  if (--used->second.entries == 0) usage_.erase(used);
  entries_.erase(it);
}

std::size_t EntryStore::bytes() const {
  std::size_t total = bytes_;
  for (const auto& [device, used] : device_bytes_) total += used;
  return total;
}

std::uint64_t EntryStore::victim(const Device* device) const {
  for (const OrderKey& key : order_) {
    const std::uint64_t id = std::get<2>(key);
    if (device == nullptr || entries_.at(id).space.device == *device) return id;
  }
  return 0;
}

bool EntryStore::device_full(const Device& device, std::size_t need) const {
  if (need == 0) return false;
  const auto it = device_bytes_.find(device);
  return (it == device_bytes_.end() ? 0 : it->second) + need > device_max_bytes_;
}

int EntryStore::insert(Entry entry, const std::function<void(const Entry&)>& on_evict) {
  const std::size_t need = entry.host_bytes(), device_need = entry.device_bytes();
  if (need > max_bytes_ || device_need > device_max_bytes_) return -1;
  if (!entry.tokens.empty()) {
    if (const Entry* same = find_exact(entry.space, entry.tokens)) remove(same->id);
  }
  int evicted = 0;
  auto evict = [&](std::uint64_t id) {
    if (on_evict) on_evict(entries_.at(id));
    remove(id);
    ++evicted;
  };
  while (!order_.empty() && (entries_.size() >= capacity_ || bytes_ + need > max_bytes_)) evict(victim(nullptr));
  // The device's budget only frees by evicting entries on that device (there
  // is one while its bytes are above zero).
  while (device_full(entry.space.device, device_need)) evict(victim(&entry.space.device));
  entry.id = next_id_++;
  entry.last_used = ++tick_;
  entry.uses = std::max<std::uint64_t>(entry.uses, 1);
  const std::uint64_t id = entry.id;
  if (!entry.tokens.empty()) exact_[exact_hash(entry.space, entry.tokens)] = id;
  if (!entry.key.empty()) {
    auto [sem, _] = semantic_.try_emplace(entry.space, static_cast<int>(entry.key.size()));
    sem->second.add(id, entry.key);
  }
  bytes_ += need;
  if (device_need > 0) device_bytes_[entry.space.device] += device_need;
  Usage& used = usage_[entry.space.name_space];
  ++used.entries;
  used.bytes += entry.bytes();
  order_.insert(order_key(entry));
  entries_.emplace(id, std::move(entry));
  return evicted;
}

void EntryStore::clear() {
  entries_.clear();
  exact_.clear();
  semantic_.clear();
  order_.clear();
  usage_.clear();
  bytes_ = 0;
  device_bytes_.clear();
}

void EntryStore::clear(std::string_view name_space) {
  std::vector<std::uint64_t> ids;
  for (const auto& [id, e] : entries_)
    if (e.space.name_space == name_space) ids.push_back(id);
  for (std::uint64_t id : ids) remove(id);
}

EntryStore::Usage EntryStore::usage(std::string_view name_space) const {
  auto it = usage_.find(name_space);
  return it == usage_.end() ? Usage{} : it->second;
}

std::vector<std::string> EntryStore::namespaces() const {
  std::vector<std::string> out;
  for (const auto& [name, used] : usage_) out.push_back(name);
  return out;
}

std::vector<const Entry*> EntryStore::entries_by_age() const {
  std::vector<const Entry*> out;
  out.reserve(entries_.size());
  for (const auto& e : entries_) out.push_back(&e.second);
  std::ranges::sort(out, {}, &Entry::last_used);
  return out;
}

}  // namespace attention_echo::cache
