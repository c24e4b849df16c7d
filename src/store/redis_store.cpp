// L2Store on one Redis server through hiredis's blocking API. Every
// operation gets a time budget (the lookup deadline, or the write timeout):
// the connect and every socket read and write get what is left of it
// (redisConnectWithTimeout, poll) and the read and write loops
// stop when it is spent, so a stopped server, or a value too large to
// arrive in time, costs a request at most its budget. A failure (a timeout
// too: a half-read reply cannot be resumed) drops every pooled connection
// (they point at the same server) and closes the store for a backoff that
// doubles per failure; the first connection after it counts as a reconnect.
#include <hiredis/hiredis.h>
#include <poll.h>
#include <signal.h>
#include <sys/time.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <climits>
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
  // Keys per MGET: a lookup sends one MGET per this many keys, one after
  // the other, so the values that arrived before the deadline are used
  // even when the rest did not (the planner reads a prompt's blocks in
  // order, 8 blocks of the bundled model are 2 MB).
  static constexpr std::size_t kKeysPerCommand = 8;

  explicit RedisStore(L2Options options) : options_(std::move(options)), backoff_(from_ms(options_.backoff_ms)) {}

  ~RedisStore() override {
    for (const Connection& c : idle_) redisFree(c.context);
  }

  std::vector<std::optional<std::string>> get(std::span<const std::string> keys) override {
    const Clock::time_point start = Clock::now();
    std::vector<std::optional<std::string>> values(keys.size());
    lookups_ += keys.size();
    std::vector<Command> mgets;
    for (std::size_t i = 0; i < keys.size(); ++i) {
      if (i % kKeysPerCommand == 0) mgets.push_back({{"MGET"}, {4}});
      mgets.back().argv.push_back(keys[i].data());
      mgets.back().lengths.push_back(keys[i].size());
    }
    const auto replies = run(mgets, start + from_ms(options_.deadline_ms), true);
    for (std::size_t m = 0; m < replies.size(); ++m) {
      const redisReply* reply = replies[m].get();
      const std::size_t first = m * kKeysPerCommand, count = mgets[m].argv.size() - 1;
      if (reply->type != REDIS_REPLY_ARRAY || reply->elements != count) {
        ++errors_;  // an error reply (e.g. the server is loading): the connection stays usable
        continue;
      }
      for (std::size_t i = 0; i < count; ++i) {
        const redisReply* r = reply->element[i];
        if (r->type == REDIS_REPLY_STRING) values[first + i].emplace(r->str, r->len), ++found_;
        else ++misses_;
      }
    }
    const std::uint64_t ns = std::chrono::duration_cast<std::chrono::nanoseconds>(Clock::now() - start).count();
    lookup_ns_ += ns;
    for (std::uint64_t longest = max_lookup_ns_; ns > longest && !max_lookup_ns_.compare_exchange_weak(longest, ns);) {
    }
    return values;
  }

  std::size_t put(std::span<const L2Write> items) override {
    std::vector<Command> sets;
    for (const L2Write& w : items) sets.push_back({{"SET", w.key.data(), w.value.data()}, {3, w.key.size(), w.value.size()}});
    std::size_t written = 0;
    for (const Reply& reply : run(sets, Clock::now() + from_ms(options_.write_timeout_ms), false)) {
      // An error reply, e.g. OOM under maxmemory with policy noeviction.
      if (reply->type == REDIS_REPLY_STATUS) ++written;
      else ++errors_;
    }
    writes_ += written;
    return written;
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
    s.max_lookup_seconds = 1e-9 * static_cast<double>(max_lookup_ns_.load());
    return s;
  }

 private:
  struct Connection {
    redisContext* context = nullptr;
    std::uint64_t generation = 0;  // of the server's life it was made in
  };

  struct Command {
    std::vector<const char*> argv;
    std::vector<std::size_t> lengths;
  };

  // The replies of `commands` on one connection, pipelined or one round
  // trip each: all of them, or those that arrived before the deadline ran
  // out or the connection failed, or none while backing off (each counted).
  // Redis answers pipelined commands it read together only once it has run
  // them all, so a lookup that must keep what arrived in time goes one at a
  // time.
  std::vector<Reply> run(std::span<const Command> commands, Clock::time_point deadline, bool one_at_a_time) {
    std::vector<Reply> replies;
    if (commands.empty()) return replies;
    std::optional<Connection> c = acquire(deadline);
    if (!c) return replies;
    const SigpipeBlock no_sigpipe;
    std::size_t sent = 0;
    // Each command is flushed before the next is added, so hiredis's output
    // buffer holds one value at a time, not a prompt's tens of MB of K/V.
    auto send = [&](std::size_t upto) {
      for (; sent < upto; ++sent) {
        const Command& command = commands[sent];
        if (redisAppendCommandArgv(c->context, static_cast<int>(command.argv.size()),
                                   const_cast<const char**>(command.argv.data()), command.lengths.data()) != REDIS_OK ||
            !flush(c->context, deadline))
          return false;
      }
      return true;
    };
    bool ok = send(one_at_a_time ? 1 : commands.size());
    while (ok && replies.size() < commands.size()) {
      Reply reply = read_reply(c->context, deadline);
      ok = reply != nullptr;
      if (ok) replies.push_back(std::move(reply));
      if (ok && sent < commands.size()) ok = send(sent + 1);
    }
    if (!ok) {
      fail(*c, deadline, !replies.empty());
      return replies;
    }
    release(*c);
    return replies;
  }

  // hiredis's own blocking calls bound each socket wait, not their sum (a
  // large value arrives in many reads): these loops check the deadline
  // between socket operations and wait for the socket, with poll(2), for
  // what is left of it. The socket timeouts alone count in scheduler
  // ticks: a wait could end a tick early (counted as an error, not a
  // timeout: the likely cause of a CI failure on 2026-12-06 that did not
  // reproduce here) or late (a 3 ms lookup on a stopped server took a
  // median 8.0 ms on the Intel VM; 3.2 ms with poll, whose timer does not
  // end early). They stay set, as the bound of a blocking send that poll
  // found room for but not for all of it.
  static bool wait_for(redisContext* c, short events, Clock::time_point deadline) {
    for (;;) {
      const Clock::duration left = deadline - Clock::now();
      if (left <= Clock::duration::zero() || redisSetTimeout(c, to_timeval(left)) != REDIS_OK) return false;
      const auto ms = std::chrono::ceil<std::chrono::milliseconds>(left).count();
      pollfd p{c->fd, events, 0};
      const int ready = poll(&p, 1, static_cast<int>(std::min<long long>(ms, INT_MAX)));
      if (ready > 0) return true;
      if (ready < 0 && errno != EINTR) return false;
    }
  }

  static bool flush(redisContext* c, Clock::time_point deadline) {
    int done = 0;
    while (!done)
      if (!wait_for(c, POLLOUT, deadline) || redisBufferWrite(c, &done) == REDIS_ERR) return false;
    return true;
  }

  static Reply read_reply(redisContext* c, Clock::time_point deadline) {
    for (;;) {
      void* reply = nullptr;
      if (redisGetReplyFromReader(c, &reply) == REDIS_ERR) return nullptr;
      if (reply) return Reply(static_cast<redisReply*>(reply));
      if (!wait_for(c, POLLIN, deadline) || redisBufferRead(c) == REDIS_ERR) return nullptr;
    }
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

  // Counts the failure and drops the connection (a half-read reply cannot be
  // resumed). Unless the server answered part of it (it is up, the
  // deadline was too short for the rest), the first failure of its
  // generation starts a backoff and drops the pooled connections too (they
  // reach the same failed server).
  void fail(Connection c, Clock::time_point deadline, bool answered = false) {
    const Clock::time_point now = Clock::now();
    ++(now >= deadline - from_ms(0.05 * options_.deadline_ms) ? timeouts_ : errors_);
    if (c.context) redisFree(c.context);
    if (answered) return;
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
      unavailable_{0}, reconnects_{0}, writes_{0}, lookup_ns_{0}, max_lookup_ns_{0};
};

}  // namespace

std::shared_ptr<L2Store> connect_redis(const L2Options& options) { return std::make_shared<RedisStore>(options); }

}  // namespace attention_echo
