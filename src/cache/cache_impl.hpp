// AttentionEchoCache's state and the steps of one call: plan, then for each
// enabled tier (best first) lookup -> serve -> guard, else a miss that
// captures for every tier; then store and stats. The mutex guards the store
// and the stats only; attention compute runs outside it, so lookups never
// wait on another call's compute.
#pragma once

#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <string>

#include "attention_echo/cache.hpp"
#include "attention_echo/thread_pool.hpp"
#include "cache/entry_store.hpp"
#include "cache/guard.hpp"
#include "cache/l2_entries.hpp"
#include "cache/tier.hpp"
#include "index/semantic_key.hpp"
#include "kernels/cpu_backend.hpp"

namespace attention_echo {

struct AttentionEchoCache::Impl {
  // An entry a tier can serve the call from.
  struct Candidate {
    std::uint64_t id;
    double similarity;
    std::shared_ptr<const cache::Payload> payload;  // keeps part alive
    const cache::TierPayload* part;                 // the tier's own
  };

  // store: the shared L2 store, else the one config.store_url names, if any.
  Impl(EchoConfig config, std::shared_ptr<L2Store> store);

  EchoResult run(const AnyHeadsView& q, const AnyHeadsView& k, const AnyHeadsView& v,
                 const MutableAnyHeadsView& out, const EchoRequest& request);

  // The backend a call runs on: the host's (cpu_backend, made once: this is
  // every call's path), or a CUDA backend for the views' device and the
  // request's stream, made into `made`, which must outlive the call.
  const kernels::Backend& backend_for(Device device, void* stream, std::unique_ptr<kernels::Backend>& made) const;
  void validate_request(const cache::Call& call, const EchoRequest& request, const kernels::Backend& backend) const;
  cache::Call plan(const AnyHeadsView& q, const AnyHeadsView& k, const AnyHeadsView& v,
                   const MutableAnyHeadsView& out, const EchoRequest& request) const;
  std::optional<Candidate> find(cache::Call& call, const cache::ReuseTier& tier);
  std::optional<Candidate> find_in_l1(cache::Call& call, const cache::ReuseTier& tier);
  bool fetch_from_l2(const cache::Call& call);
  std::optional<Candidate> find_by_tokens(const cache::Call& call, Tier tier);
  std::optional<Candidate> find_similar(cache::Call& call, Tier tier);
  bool serve(cache::Call& call, const cache::ReuseTier& tier, const Candidate& candidate,
             const kernels::Backend& backend);
  std::optional<cache::Entry> compute_miss(cache::Call& call, const kernels::Backend& backend);
  void finish(const cache::Call& call, std::optional<cache::Entry> entry, std::optional<std::uint64_t> replaced);

  // Under the mutex: `add` applied to the cache-wide stats and to those of
  // name_space (the sum over namespaces stays the cache-wide value).
  void count(std::string_view name_space, const std::function<void(CacheStats&)>& add);
  // Under the mutex: the eviction callback of EntryStore::insert.
  void count_eviction(const cache::Entry& victim);

  const EchoConfig config;
  const cache::TierSet tiers;
  const cache::Guard guard;
  ThreadPool pool;
  const kernels::CpuBackend cpu_backend{pool};
  index::SemanticKeyer keyer;
  mutable std::mutex mutex;
  cache::EntryStore store;
  CacheStats stats;
  // Counters per namespace (entries and bytes come from store.usage).
  std::map<std::string, CacheStats, std::less<>> namespace_stats;
  const std::optional<cache::L2Entries> l2;  // config.store_url set: the shared store
};

}  // namespace attention_echo
