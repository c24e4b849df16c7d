// The entries and their three indexes: exact (key space + prefix tokens),
// semantic (one SemanticIndex per key space) and eviction order (LRU or LFU).
// Not thread-safe: AttentionEchoCache calls it under its mutex, and only for
// bookkeeping — attention compute never runs while the lock is held.
#pragma once

#include <cstdint>
#include <functional>
#include <map>
#include <set>
#include <span>
#include <string>
#include <string_view>
#include <tuple>
#include <unordered_map>
#include <vector>

#include "attention_echo/config.hpp"
#include "cache/entry.hpp"
#include "index/semantic_index.hpp"

namespace attention_echo::cache {

class EntryStore {
 public:
  EntryStore(EvictionPolicy policy, std::size_t capacity, std::size_t max_bytes, std::size_t device_max_bytes)
      : policy_(policy), capacity_(capacity), max_bytes_(max_bytes), device_max_bytes_(device_max_bytes) {}

  std::size_t size() const { return entries_.size(); }
  // Host and device bytes together.
  std::size_t bytes() const;

  // What one namespace holds (tenants: per-namespace stats).
  struct Usage {
    std::size_t entries = 0;
    std::size_t bytes = 0;
  };
  Usage usage(std::string_view name_space) const;
  // Namespaces holding at least one entry.
  std::vector<std::string> namespaces() const;

  // Entry with these exact tokens in this space, or null.
  const Entry* find_exact(const KeySpace& space, std::span<const std::int32_t> tokens) const;
  // Up to k entries of this space by similarity >= min_similarity, best first.
  std::vector<index::Candidate> find_similar(const KeySpace& space, std::span<const float> key, int k,
                                             float min_similarity) const;
  const Entry* get(std::uint64_t id) const;

  void touch(std::uint64_t id);  // a hit: update recency / frequency
  void remove(std::uint64_t id);
  // Inserts, first removing an entry with the same exact tokens and evicting
  // by policy until the limits hold (capacity and max_bytes: any entry;
  // device_max_bytes: entries on the new entry's device), telling on_evict
  // about each victim before it goes. Returns the number of evictions; an
  // entry larger than a limit on its own is not stored (returns -1).
  int insert(Entry entry, const std::function<void(const Entry&)>& on_evict = {});
  void clear();
  void clear(std::string_view name_space);  // that namespace's entries only

  // Every entry, oldest-used first (the order a reload should insert them).
  std::vector<const Entry*> entries_by_age() const;

 private:
  using OrderKey = std::tuple<std::uint64_t, std::uint64_t, std::uint64_t>;  // (rank, last_used, id)
  OrderKey order_key(const Entry& e) const;
  std::uint64_t exact_hash(const KeySpace& space, std::span<const std::int32_t> tokens) const;
  // The first entry in eviction order on `device` (null: on any).
  std::uint64_t victim(const Device* device) const;
  bool device_full(const Device& device, std::size_t need) const;

  EvictionPolicy policy_;
  std::size_t capacity_;
  std::size_t max_bytes_;
  std::size_t device_max_bytes_;
  std::size_t bytes_ = 0;                       // host bytes
  std::map<Device, std::size_t> device_bytes_;  // CUDA devices holding payloads
  std::uint64_t tick_ = 0;
  std::uint64_t next_id_ = 1;
  std::unordered_map<std::uint64_t, Entry> entries_;
  std::unordered_map<std::uint64_t, std::uint64_t> exact_;  // exact_hash -> id
  std::map<KeySpace, index::SemanticIndex> semantic_;
  std::set<OrderKey> order_;  // eviction victim first
  std::map<std::string, Usage, std::less<>> usage_;  // namespaces with entries
};

}  // namespace attention_echo::cache
