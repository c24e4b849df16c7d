// AttentionEchoCache's state and the steps of one call. The mutex guards the
// store and the stats only; attention compute runs outside it, so lookups
// never wait on another call's compute.
#pragma once

#include <memory>
#include <mutex>
#include <optional>

#include "attention_echo/cache.hpp"
#include "attention_echo/thread_pool.hpp"
#include "cache/entry_store.hpp"
#include "index/semantic_key.hpp"

namespace attention_echo {

struct AttentionEchoCache::Impl {
  struct Call;
  struct Candidate {
    std::uint64_t id;
    double similarity;
    std::shared_ptr<const cache::Payload> payload;
  };

  explicit Impl(EchoConfig config);

  EchoResult run(const HeadsView& q, const HeadsView& k, const HeadsView& v, const MutableHeadsView& out,
                 const EchoRequest& request);

  void validate_request(const HeadsView& q, const HeadsView& k, const HeadsView& v, const MutableHeadsView& out,
                        const EchoRequest& request) const;
  Call plan(const HeadsView& q, const HeadsView& k, const HeadsView& v, const MutableHeadsView& out,
            const EchoRequest& request) const;
  bool try_exact(Call& call);
  std::optional<Candidate> find_echo(Call& call);
  bool serve_echo(Call& call, const Candidate& candidate);
  std::optional<cache::Entry> compute_miss(Call& call);
  void finish(Call& call, std::optional<cache::Entry> entry, std::optional<std::uint64_t> replaced);

  const EchoConfig config;
  ThreadPool pool;
  index::SemanticKeyer keyer;
  mutable std::mutex mutex;
  cache::EntryStore store;
  CacheStats stats;
};

}  // namespace attention_echo
