#include "kernels/cpu_backend.hpp"

#include <cstring>
#include <stdexcept>
#include <string>

#include "core/isa.hpp"
#include "kernels/row_block.hpp"

namespace attention_echo::kernels {
namespace {

[[noreturn]] void fail(const char* name, const std::string& what) {
  throw std::invalid_argument(std::string(name) + ": " + what);
}

template <typename T>
void require_host(const char* name, const BasicHeadsView<T>& view) {
  if (view.device != Device::cpu())
    fail(name, "must be in host memory for the CPU backend, got " + to_string(view.device));
}

void require_host(const AttentionProblem& p) {
  require_host("query", p.q);
  require_host("key", p.k);
  require_host("value", p.v);
  require_host("out", p.out);
}

}  // namespace

CpuTarget CpuBackend::target() const {
  switch (active_isa()) {
    case Isa::kAvx512: return {run_block_avx512, pool_};
    case Isa::kAvx2: return {run_block_avx2, pool_};
    case Isa::kScalar: break;
  }
  return {run_block_scalar, pool_};
}

void CpuBackend::exact_rows(const AttentionProblem& problem, int row_begin, int row_end) const {
  require_host(problem);
  kernels::exact_rows(target(), problem, row_begin, row_end, nullptr, 0, nullptr);
}

TileMass CpuBackend::exact_rows_with_tile_mass(const AttentionProblem& problem, int prefix, int block) const {
  require_host(problem);
  TileMass mass;
  mass.block = block;
  kernels::exact_rows(target(), problem, problem.query_offset, problem.rows_end(), &mass, prefix, nullptr);
  return mass;
}

DenseLogits CpuBackend::exact_rows_with_dense_logits(const AttentionProblem& problem, int prefix) const {
  require_host(problem);
  return kernels::exact_rows_with_dense_logits(target(), problem, prefix);
}

void CpuBackend::sparse_rows(const AttentionProblem& problem, int rows, const TileSet& kept) const {
  require_host(problem);
  kernels::sparse_rows(target(), problem, rows, kept);
}

void CpuBackend::dense_echo_rows(const AttentionProblem& problem, int rows, const DenseLogits& cached,
                                 float adjustment_strength, bool enable_jacobian) const {
  require_host(problem);
  kernels::dense_echo_rows(target(), problem, rows, cached, adjustment_strength, enable_jacobian);
}

void CpuBackend::selected_rows(const AttentionProblem& problem, std::span<const int> rows,
                               const MutableHeadsView& result) const {
  require_host(problem);
  require_host("result", result);
  kernels::selected_rows(target(), problem, rows, result);
}

void CpuBackend::copy_rows(const HeadsView& src, const MutableHeadsView& dst, int rows) const {
  require_host("src", src);
  require_host("dst", dst);
  if (dst.heads != src.heads || dst.dim != src.dim) fail("dst", "heads and dim must match src's");
  if (rows < 0 || rows > src.tokens || rows > dst.tokens) fail("rows", "must be in [0, min(src, dst tokens)]");
  for (int h = 0; h < src.heads; ++h)
    for (int t = 0; t < rows; ++t) std::memcpy(dst.row(h, t), src.row(h, t), sizeof(float) * src.dim);
}

// Four independent multiply-xorshift lanes keep the loop at memory speed
// instead of one long dependency chain.
std::uint64_t CpuBackend::k_fingerprint(const HeadsView& k, int prefix) const {
  require_host("key", k);
  if (prefix < 0 || prefix > k.tokens) fail("prefix", "must be in [0, key tokens]");
  constexpr std::uint64_t kMul = 0x9fb21c651e98df25ULL;
  std::uint64_t lane[4] = {0x243f6a8885a308d3ULL, 0x13198a2e03707344ULL, 0xa4093822299f31d0ULL,
                           0x082efa98ec4e6c89ULL};
  auto mix = [&](std::uint64_t& h, std::uint64_t word) {
    h = (h ^ word) * kMul;
    h ^= h >> 32;
  };
  for (int kh = 0; kh < k.heads; ++kh)
    for (int t = 0; t < prefix; ++t) {
      const auto* bytes = reinterpret_cast<const unsigned char*>(k.row(kh, t));
      const std::size_t n = sizeof(float) * static_cast<std::size_t>(k.dim);
      std::size_t i = 0;
      for (; i + 32 <= n; i += 32)
        for (int l = 0; l < 4; ++l) {
          std::uint64_t word;
          std::memcpy(&word, bytes + i + 8 * l, 8);
          mix(lane[l], word);
        }
      for (; i + 4 <= n; i += 4) {
        std::uint32_t word;
        std::memcpy(&word, bytes + i, 4);
        mix(lane[0], word);
      }
    }
  std::uint64_t h = lane[0];
  for (int l = 1; l < 4; ++l) mix(h, lane[l]);
  return h;
}

// ---- transitional free functions (see attention_kernel.hpp) ----------------

void exact_rows(const AttentionProblem& problem, int row_begin, int row_end, ThreadPool& pool, TileMass* mass,
                int prefix) {
  if (mass == nullptr) return CpuBackend(pool).exact_rows(problem, row_begin, row_end);
  if (row_begin != 0 || row_end != problem.rows_end()) fail("row_end", "tile mass needs rows [0, T)");
  *mass = CpuBackend(pool).exact_rows_with_tile_mass(problem, prefix, mass->block);
}

void sparse_rows(const AttentionProblem& problem, int rows, const TileSet& kept, ThreadPool& pool) {
  CpuBackend(pool).sparse_rows(problem, rows, kept);
}

void selected_rows(const AttentionProblem& problem, std::span<const int> rows, float* result, ThreadPool& pool) {
  const auto n = static_cast<int>(rows.size());
  CpuBackend(pool).selected_rows(problem, rows, MutableHeadsView::contiguous(result, problem.q.heads, n, problem.q.dim));
}

DenseLogits exact_rows_with_dense_logits(const AttentionProblem& problem, int prefix, ThreadPool& pool) {
  return CpuBackend(pool).exact_rows_with_dense_logits(problem, prefix);
}

void dense_echo_rows(const AttentionProblem& problem, int rows, const DenseLogits& cached,
                     float adjustment_strength, bool enable_jacobian, ThreadPool& pool) {
  CpuBackend(pool).dense_echo_rows(problem, rows, cached, adjustment_strength, enable_jacobian);
}

}  // namespace attention_echo::kernels
