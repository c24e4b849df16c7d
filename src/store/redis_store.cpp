// L2Store on one Redis server through hiredis's blocking API. Every
// operation gets a time budget (the lookup deadline, or the write timeout):
// the connect and each socket wait are bounded by what is left of it
// (redisConnectWithTimeout, redisSetTimeout), so a stopped server costs a
// request at most its budget. A failure drops every pooled connection (they
// point at the same server) and closes the store for a backoff that doubles
// per failure; the first connection after it counts as a reconnect.
#include <hiredis/hiredis.h>
#include <signal.h>
#include <sys/time.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <mutex>
#include <string>
#include <vector>

#include "attention_echo/l2_store.hpp"

namespace attention_echo {
namespace {

using Clock = std::chrono::steady_clock;

Clock::duration from_ms(double ms) {
  return std::chrono::duration_cast<Clock::duration>(std::chrono::duration<double, std::milli>(ms));
}

// At least 1 us: a zero timeval would mean "no timeout" to the socket.
timeval to_timeval(Clock::duration d) {
  const auto us = std::max<long long>(1, std::chrono::duration_cast<std::chrono::microseconds>(d).count());
  return timeval{static_cast<time_t>(us / 1000000), static_cast<suseconds_t>(us % 1000000)};
}

// hiredis writes with write(2): a server that closed the connection would
// raise SIGPIPE, which kills the process by default. Blocked on this thread
// for the command, and a SIGPIPE it raised is consumed before unblocking.
class SigpipeBlock {
 public:
  SigpipeBlock() {
    sigemptyset(&pipe_);
    sigaddset(&pipe_, SIGPIPE);
    sigset_t pending;
    sigpending(&pending);
    was_pending_ = sigismember(&pending, SIGPIPE) == 1;
    pthread_sigmask(SIG_BLOCK, &pipe_, &old_);
  }
  ~SigpipeBlock() {
    sigset_t pending;
    sigpending(&pending);
    if (!was_pending_ && sigismember(&pending, SIGPIPE) == 1) {
      const timespec now{0, 0};
      sigtimedwait(&pipe_, nullptr, &now);
    }
    pthread_sigmask(SIG_SETMASK, &old_, nullptr);
  }
  SigpipeBlock(const SigpipeBlock&) = delete;
  SigpipeBlock& operator=(const SigpipeBlock&) = delete;

 private:
  sigset_t pipe_, old_;
  bool was_pending_ = false;
};

struct ReplyDeleter {
  void operator()(redisReply* r) const { freeReplyObject(r); }
};
using Reply = std::unique_ptr<redisReply, ReplyDeleter>;

class RedisStore final : public L2Store {
 public:
  explicit RedisStore(L2Options options) : options_(std::move(options)), backoff_(from_ms(options_.backoff_ms)) {}

  ~RedisStore() override {
    for (const Connection& c : idle_) redisFree(c.context);
  }

  std::vector<std::optional<std::string>> get(std::span<const std::string> keys) override {
    const Clock::time_point start = Clock::now();
    std::vector<std::optional<std::string>> values(keys.size());
    lookups_ += keys.size();
    std::vector<const char*> argv{"MGET"};
    std::vector<std::size_t> lengths{4};
    for (const std::string& k : keys) argv.push_back(k.data()), lengths.push_back(k.size());
    if (Reply reply = command(argv, lengths, start + from_ms(options_.deadline_ms))) {
      if (reply->type == REDIS_REPLY_ARRAY && reply->elements == keys.size()) {
        for (std::size_t i = 0; i < keys.size(); ++i) {
          const redisReply* r = reply->element[i];
          if (r->type == REDIS_REPLY_STRING) values[i].emplace(r->str, r->len), ++found_;
          else ++misses_;
        }
      } else {
        ++errors_;  // an error reply (e.g. the server is loading): the connection stays usable
      }
    }
    lookup_ns_ += std::chrono::duration_cast<std::chrono::nanoseconds>(Clock::now() - start).count();
    return values;
  }

  bool put(std::string_view key, std::string_view value) override {
    std::vector<const char*> argv{"SET", key.data(), value.data()};
    std::vector<std::size_t> lengths{3, key.size(), value.size()};
    const Reply reply = command(argv, lengths, Clock::now() + from_ms(options_.write_timeout_ms));
    if (!reply) return false;
    if (reply->type != REDIS_REPLY_STATUS) {  // e.g. OOM under maxmemory with policy noeviction
      ++errors_;
      return false;
    }
    ++writes_;
    return true;
  }

  void reject() override { ++rejected_; }

  L2Stats stats() const override {
    L2Stats s;
    s.lookups = lookups_;
    s.rejected = rejected_;
    s.hits = found_ - s.rejected;
    s.misses = misses_;
    s.timeouts = timeouts_;
    s.errors = errors_;
    s.unavailable = unavailable_;
    s.reconnects = reconnects_;
    s.writes = writes_;
    s.lookup_seconds = 1e-9 * static_cast<double>(lookup_ns_.load());
    return s;
  }

 private:
  struct Connection {
    redisContext* context = nullptr;
    std::uint64_t generation = 0;  // of the server's life it was made in
  };

  // The reply, or null when the command did not complete by `deadline`, the
  // connection failed, or the store is backing off (each counted).
  Reply command(std::vector<const char*>& argv, const std::vector<std::size_t>& lengths,
                Clock::time_point deadline) {
    std::optional<Connection> c = acquire(deadline);
    if (!c) return nullptr;
    redisSetTimeout(c->context, to_timeval(deadline - Clock::now()));
    const SigpipeBlock no_sigpipe;
    Reply reply(static_cast<redisReply*>(
        redisCommandArgv(c->context, static_cast<int>(argv.size()), argv.data(), lengths.data())));
    if (!reply) {
      fail(*c, deadline);
      return nullptr;
    }
    release(*c);
    return reply;
  }

  // A pooled connection or a new one; nothing while backing off.
  std::optional<Connection> acquire(Clock::time_point deadline) {
    Connection c;
    {
      std::lock_guard lock(mutex_);
      if (Clock::now() < retry_at_) {
        ++unavailable_;
        return std::nullopt;
      }
      if (!idle_.empty()) {
        c = idle_.back();
        idle_.pop_back();
        return c;
      }
      c.generation = generation_;
    }
    c.context = redisConnectWithTimeout(options_.host.c_str(), options_.port, to_timeval(deadline - Clock::now()));
    if (c.context == nullptr || c.context->err) {
      fail(c, deadline);
      return std::nullopt;
    }
    std::lock_guard lock(mutex_);
    if (failed_) ++reconnects_, failed_ = false;
    return c;
  }

  void release(Connection c) {
    std::lock_guard lock(mutex_);
    backoff_ = from_ms(options_.backoff_ms);
    if (c.generation == generation_) idle_.push_back(c);
    else redisFree(c.context);
  }

  // Counts the failure; the first of its generation starts a backoff and
  // drops the pooled connections (they reach the same failed server).
  void fail(Connection c, Clock::time_point deadline) {
    const Clock::time_point now = Clock::now();
    ++(now >= deadline - from_ms(0.05 * options_.deadline_ms) ? timeouts_ : errors_);
    if (c.context) redisFree(c.context);
    std::lock_guard lock(mutex_);
    if (c.generation != generation_) return;
    ++generation_;
    for (const Connection& old : idle_) redisFree(old.context);
    idle_.clear();
    failed_ = true;
    retry_at_ = now + backoff_;
    backoff_ = std::min(2 * backoff_, from_ms(options_.max_backoff_ms));
  }

  const L2Options options_;
  std::mutex mutex_;
  std::vector<Connection> idle_;
  std::uint64_t generation_ = 0;
  bool failed_ = false;  // no good connection since the last failure
  Clock::time_point retry_at_{};
  Clock::duration backoff_;
  std::atomic<std::uint64_t> lookups_{0}, found_{0}, misses_{0}, rejected_{0}, timeouts_{0}, errors_{0},
      unavailable_{0}, reconnects_{0}, writes_{0}, lookup_ns_{0};
};

}  // namespace

std::shared_ptr<L2Store> connect_redis(const L2Options& options) { return std::make_shared<RedisStore>(options); }

}  // namespace attention_echo
