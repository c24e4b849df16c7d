#include "attention_echo/thread_pool.hpp"

#include <algorithm>
#include <atomic>
#include <exception>

namespace attention_echo {

struct ThreadPool::Job {
  const std::function<void(std::size_t)>* fn = nullptr;
  std::size_t n = 0;
  std::atomic<std::size_t> next{0};
  std::atomic<std::size_t> finished{0};
  std::mutex mutex;
  std::condition_variable done;
  std::exception_ptr error;
};

ThreadPool::ThreadPool(int threads) {
  if (threads <= 0) threads = static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
  for (int i = 1; i < threads; ++i) workers_.emplace_back([this] { worker_loop(); });
}

ThreadPool::~ThreadPool() {
  {
    std::lock_guard lock(mutex_);
    stopping_ = true;
  }
  wake_.notify_all();
  for (auto& w : workers_) w.join();
}

// Claims indices one at a time until the job is exhausted. Work items are
// coarse (a head x query tile), so one atomic per item is noise.
void ThreadPool::run_chunk(Job& job) {
  std::size_t ran = 0;
  for (std::size_t i; (i = job.next.fetch_add(1)) < job.n; ++ran) {
    try {
      (*job.fn)(i);
    } catch (...) {
      std::lock_guard lock(job.mutex);
      if (!job.error) job.error = std::current_exception();
    }
  }
  if (ran != 0 && job.finished.fetch_add(ran) + ran == job.n) {
    std::lock_guard lock(job.mutex);
    job.done.notify_all();
  }
}

void ThreadPool::worker_loop() {
  for (;;) {
    std::shared_ptr<Job> job;
    {
      std::unique_lock lock(mutex_);
      wake_.wait(lock, [this] { return stopping_ || !queue_.empty(); });
      if (stopping_) return;
      job = queue_.front();
      // A job stays queued until its indices run out, so idle workers join it.
      if (job->next.load() >= job->n) {
        queue_.pop_front();
        continue;
      }
    }
    run_chunk(*job);
  }
}

void ThreadPool::parallel_for(std::size_t n, const std::function<void(std::size_t)>& fn) {
  if (n == 0) return;
  if (workers_.empty() || n == 1) {
    for (std::size_t i = 0; i < n; ++i) fn(i);
    return;
  }
  auto job = std::make_shared<Job>();
  job->fn = &fn;
  job->n = n;
  {
    std::lock_guard lock(mutex_);
    queue_.push_back(job);
  }
  wake_.notify_all();
  run_chunk(*job);
  {
    std::unique_lock lock(job->mutex);
    job->done.wait(lock, [&] { return job->finished.load() == job->n; });
  }
  {
    std::lock_guard lock(mutex_);
    std::erase(queue_, job);
  }
  if (job->error) std::rethrow_exception(job->error);
}

}  // namespace attention_echo
