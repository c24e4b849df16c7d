// A small fork-join pool. parallel_for may be called from many threads at
// once (concurrent cache calls share one pool); the caller works on its own
// job too, so a pool of N workers never deadlocks on nested or concurrent use.
#pragma once

#include <condition_variable>
#include <cstddef>
#include <deque>
#include <functional>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

namespace attention_echo {

class ThreadPool {
 public:
  // threads: total threads working on a job, the caller included (0 = all
  // hardware threads). threads == 1 runs everything on the caller.
  explicit ThreadPool(int threads = 0);
  ~ThreadPool();
  ThreadPool(const ThreadPool&) = delete;
  ThreadPool& operator=(const ThreadPool&) = delete;

  int size() const { return static_cast<int>(workers_.size()) + 1; }

  // Calls fn(i) for every i in [0, n), spread over the pool; returns when all
  // are done. The first exception thrown by fn is rethrown here.
  void parallel_for(std::size_t n, const std::function<void(std::size_t)>& fn);

 private:
  struct Job;
  void worker_loop();
  static void run_chunk(Job& job);

  std::vector<std::thread> workers_;
  std::mutex mutex_;
  std::condition_variable wake_;
  std::deque<std::shared_ptr<Job>> queue_;
  bool stopping_ = false;
};

}  // namespace attention_echo
