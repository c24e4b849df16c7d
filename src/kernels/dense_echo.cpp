#include "kernels/dense_echo.hpp"

#include <cstdint>

#if defined(__linux__)
#include <sys/mman.h>
#endif

#include "core/errors.hpp"

namespace attention_echo::kernels {
namespace {

// mean[d] = mean of q[h, 0:rows)[d], accumulated in double (a Taylor step is
// a small difference of two means, so their rounding matters).
void mean_query(const AttentionProblem& problem, int h, int rows, double* mean) {
  const int dim = problem.q.dim;
  for (int d = 0; d < dim; ++d) mean[d] = 0.0;
  for (int i = 0; i < rows; ++i) {
    const float* qi = problem.q.row(h, i);
    for (int d = 0; d < dim; ++d) mean[d] += qi[d];
  }
  for (int d = 0; d < dim; ++d) mean[d] /= rows;
}

// n floats in v, zero. p^2/2 floats per head are hundreds of MB at p = 4096,
// and faulting them in one 4 KiB page at a time on the first write (the
// zero fill) costs about half an exact pass of the block. So on Linux a
// large buffer asks for transparent huge pages and has its page tables
// populated up front, split over the pool's threads; both are advice, and a
// kernel without them just takes the faults.
void allocate_zeroed(std::vector<float>& v, std::size_t n, ThreadPool& pool) {
  v.reserve(n);
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr std::uintptr_t kHuge = std::uintptr_t{2} << 20;
  const auto begin = reinterpret_cast<std::uintptr_t>(v.data());
  const std::uintptr_t first = (begin + kHuge - 1) & ~(kHuge - 1), last = (begin + n * sizeof(float)) & ~(kHuge - 1);
  if (last > first) {
    madvise(reinterpret_cast<void*>(first), last - first, MADV_HUGEPAGE);
#if defined(MADV_POPULATE_WRITE)
    const std::size_t pages = (last - first) / kHuge, pieces = 4 * static_cast<std::size_t>(pool.size());
    pool.parallel_for(pieces, [&](std::size_t i) {
      const std::size_t from = pages * i / pieces, to = pages * (i + 1) / pieces;
      if (to > from) madvise(reinterpret_cast<void*>(first + from * kHuge), (to - from) * kHuge, MADV_POPULATE_WRITE);
    });
#endif
  }
#else
  (void)pool;
#endif
  v.resize(n);
}

void check_cached(const AttentionProblem& problem, const DenseLogits& c) {
  if (c.heads != problem.q.heads || c.dim != problem.q.dim || c.causal != problem.causal ||
      c.logits.size() != c.head_size() * static_cast<std::size_t>(c.heads) ||
      c.mean_query.size() != static_cast<std::size_t>(c.heads) * c.dim)
    throw_invalid("cached", "dense logits do not match the problem's heads, dim or mask");
}

}  // namespace

DenseLogits exact_rows_with_dense_logits(const CpuTarget& cpu, const AttentionProblem& problem, int prefix) {
  require_prefix_rows(problem);
  ThreadPool& pool = cpu.pool;
  DenseLogits c;
  c.heads = problem.q.heads;
  c.prefix = prefix;
  c.dim = problem.q.dim;
  c.causal = problem.causal;
  // Every entry is written by the kernel (each prefix row's keys [0, key_end)).
  allocate_zeroed(c.logits, c.head_size() * c.heads, pool);
  exact_rows(cpu, problem, 0, problem.rows_end(), nullptr, prefix, c.logits.data());
  c.mean_query.assign(static_cast<std::size_t>(c.heads) * c.dim, 0.0f);
  if (prefix == 0) return c;
  pool.parallel_for(static_cast<std::size_t>(c.heads), [&](std::size_t h) {
    std::vector<double> mean(c.dim);
    mean_query(problem, static_cast<int>(h), prefix, mean.data());
    for (int d = 0; d < c.dim; ++d) c.mean_query[h * c.dim + d] = static_cast<float>(mean[d]);
  });
  return c;
}

std::vector<float> dense_taylor_shift(const AttentionProblem& problem, int rows, const DenseLogits& cached,
                                      float adjustment_strength, ThreadPool& pool) {
  require_prefix_rows(problem);
  check_cached(problem, cached);
  if (rows < 0 || rows > cached.prefix || rows > problem.q.tokens)
    throw_invalid("rows", "must be in [0, min(T, cached prefix)]");
  const int heads = problem.q.heads, dim = problem.q.dim;
  const int keys = cached.causal ? rows : cached.prefix;
  std::vector<float> shift(static_cast<std::size_t>(heads) * keys, 0.0f);
  if (rows == 0) return shift;
  pool.parallel_for(static_cast<std::size_t>(heads), [&](std::size_t head) {
    const int h = static_cast<int>(head);
    std::vector<double> mean(dim);
    mean_query(problem, h, rows, mean.data());
    // delta = alpha * scale * (qbar - qbar_c): one scaled vector, then a dot per key.
    std::vector<float> delta(dim);
    const float* cached_mean = cached.mean_query.data() + head * dim;
    for (int d = 0; d < dim; ++d)
      delta[d] = static_cast<float>(static_cast<double>(adjustment_strength) * problem.scale *
                                    (mean[d] - static_cast<double>(cached_mean[d])));
    const int kvh = problem.kv_head(h);
    float* u = shift.data() + head * keys;
    for (int j = 0; j < keys; ++j) {
      const float* kj = problem.k.row(kvh, j);
      float acc = 0.0f;
#pragma omp simd reduction(+ : acc)
      for (int d = 0; d < dim; ++d) acc += delta[d] * kj[d];
      u[j] = acc;
    }
  });
  return shift;
}

void dense_echo_rows(const CpuTarget& cpu, const AttentionProblem& problem, int rows, const DenseLogits& cached,
                     float adjustment_strength, bool enable_jacobian) {
  check_cached(problem, cached);
  const int keys = cached.causal ? rows : cached.prefix;
  std::vector<float> shift;
  if (enable_jacobian && adjustment_strength != 0.0f)
    shift = dense_taylor_shift(problem, rows, cached, adjustment_strength, cpu.pool);
  cached_rows(cpu, problem, rows, cached.logits.data(), cached.layout(), shift.empty() ? nullptr : shift.data(),
              keys);
}

}  // namespace attention_echo::kernels
