// L2Store: a byte store shared by processes (Redis), beside each process's
// in-memory L1 (the cache's entries, the planner's K/V blocks). The cache
// and the planner talk to this interface, never to Redis: they build keys,
// write values through after computing them and read them back on an L1
// miss, checking every value themselves (checksum, key, shapes) before use.
//
// Guarantees of every implementation:
//   - a lookup returns within its deadline (options.deadline_ms), found or
//     not: a slow or stopped server is a timeout, never a stalled request;
//   - failures are counted, never thrown: the caller serves from L1 or
//     computes; after a failure the store does not try again before a
//     backoff that doubles up to max_backoff_ms (reconnections counted);
//   - thread-safe (a pool of connections, one per concurrent caller).
// Its memory bound is the server's own (Redis: maxmemory with an LRU
// policy, README "Shared store (Redis)").
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

namespace attention_echo {

struct L2Options {
  std::string host = "127.0.0.1";
  int port = 6379;
  double deadline_ms = 3.0;         // a lookup returns within this
  double write_timeout_ms = 50.0;   // a write-through gives up after this
  double backoff_ms = 50.0;         // first wait after a failure, doubled per failure
  double max_backoff_ms = 5000.0;
};

// "redis://HOST:PORT", optionally with "?deadline_ms=3&write_timeout_ms=50
// &backoff_ms=50&max_backoff_ms=5000". Throws std::invalid_argument starting
// with `argument` on anything else.
L2Options parse_l2_url(std::string_view url, std::string_view argument = "store_url");

// Counters of one store (consistent enough for reports: each is atomic).
struct L2Stats {
  std::uint64_t lookups = 0;      // keys asked for
  std::uint64_t hits = 0;         // values found and accepted by the caller
  std::uint64_t misses = 0;       // keys the server did not hold
  std::uint64_t rejected = 0;     // values found but refused: checksum, key or shape mismatch
  std::uint64_t timeouts = 0;     // lookups or writes that ran into their deadline
  std::uint64_t errors = 0;       // other failures: connection refused or lost, server errors
  std::uint64_t unavailable = 0;  // operations skipped while backing off after a failure
  std::uint64_t reconnects = 0;   // connections made again after a failure
  std::uint64_t writes = 0;       // values written through
  double lookup_seconds = 0.0;    // wall time spent in lookups, connects included
  double max_lookup_seconds = 0.0;  // the longest lookup: the deadline plus a socket call's overshoot
  double hit_rate() const { return lookups ? double(hits) / double(lookups) : 0.0; }
};

struct L2Write {
  std::string key, value;
};

class L2Store {
 public:
  virtual ~L2Store() = default;
  // One value per key (nullopt: not held, or not read in time), within the
  // deadline. What arrived before the deadline is
  // returned even when the rest did not: values come in key order, so a
  // caller reading consecutive blocks gets a prefix of them.
  virtual std::vector<std::optional<std::string>> get(std::span<const std::string> keys) = 0;
  // Writes through, in one round trip (pipelined, so keys may live on
  // different cluster slots); returns how many were written (failures
  // counted).
  virtual std::size_t put(std::span<const L2Write> items) = 0;
  // The caller refused a value get() returned: counted as rejected, not hit.
  virtual void reject() = 0;
  virtual L2Stats stats() const = 0;
};

// A store on the Redis server `options` names. Connects lazily: a server
// that is down now is counted on first use, not thrown. Throws
// std::runtime_error when the library was built without Redis (AE_REDIS=OFF).
std::shared_ptr<L2Store> connect_redis(const L2Options& options);

}  // namespace attention_echo
