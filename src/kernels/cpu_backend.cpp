#include "kernels/cpu_backend.hpp"

#include <cstring>
#include <string>

#include "core/errors.hpp"
#include "core/isa.hpp"
#include "kernels/row_block.hpp"

namespace attention_echo::kernels {

CpuTarget CpuBackend::target() const {
  switch (active_isa()) {
    case Isa::kAvx512: return {run_block_avx512, pool_};
    case Isa::kAvx2: return {run_block_avx2, pool_};
    case Isa::kScalar: break;
  }
  return {run_block_scalar, pool_};
}

void CpuBackend::exact_rows(const AttentionProblem& problem, int row_begin, int row_end) const {
  require_device(problem);
  kernels::exact_rows(target(), problem, row_begin, row_end, nullptr, 0, nullptr);
}

TileMass CpuBackend::exact_rows_with_tile_mass(const AttentionProblem& problem, int prefix, int block) const {
  require_device(problem);
  TileMass mass;
  mass.block = block;
  kernels::exact_rows(target(), problem, problem.query_offset, problem.rows_end(), &mass, prefix, nullptr);
  return mass;
}

DenseLogits CpuBackend::exact_rows_with_dense_logits(const AttentionProblem& problem, int prefix) const {
  require_device(problem);
  return kernels::exact_rows_with_dense_logits(target(), problem, prefix);
}

void CpuBackend::sparse_rows(const AttentionProblem& problem, int rows, const TileSet& kept) const {
  require_device(problem);
  kernels::sparse_rows(target(), problem, rows, kept);
}

void CpuBackend::dense_echo_rows(const AttentionProblem& problem, int rows, const DenseLogits& cached,
                                 float adjustment_strength, bool enable_jacobian) const {
  require_device(problem);
  kernels::dense_echo_rows(target(), problem, rows, cached, adjustment_strength, enable_jacobian);
}

void CpuBackend::selected_rows(const AttentionProblem& problem, std::span<const int> rows,
                               const MutableHeadsView& result) const {
  require_device(problem);
  require_device("result", result.device);
  kernels::selected_rows(target(), problem, rows, result);
}

void CpuBackend::copy_rows(const HeadsView& src, const MutableHeadsView& dst, int rows) const {
  require_device("src", src.device);
  require_device("dst", dst.device);
  if (dst.heads != src.heads || dst.dim != src.dim) throw_invalid("dst", "heads and dim must match src's");
  if (rows < 0 || rows > src.tokens || rows > dst.tokens) throw_invalid("rows", "must be in [0, min(src, dst tokens)]");
  for (int h = 0; h < src.heads; ++h)
    for (int t = 0; t < rows; ++t) std::memcpy(dst.row(h, t), src.row(h, t), sizeof(float) * src.dim);
}

// Four independent multiply-xorshift lanes keep the loop at memory speed
// instead of one long dependency chain.
std::uint64_t CpuBackend::k_fingerprint(const HeadsView& k, int prefix) const {
  require_device("key", k.device);
  if (prefix < 0 || prefix > k.tokens) throw_invalid("prefix", "must be in [0, key tokens]");
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

}  // namespace attention_echo::kernels
