#include "kernels/cpu_backend.hpp"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <string>
#include <vector>

#include "core/errors.hpp"
#include "core/isa.hpp"
#include "kernels/row_block.hpp"

namespace attention_echo::kernels {
namespace {

void require_f32(std::string_view name, DType dtype) {
  if (dtype != DType::kF32) throw_invalid(name, "must be float32 on the host, got " + to_string(dtype));
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

void CpuBackend::check_problem(const AnyAttentionProblem& problem) const {
  require_device("query", problem.q.device);
  require_device("key", problem.k.device);
  require_device("value", problem.v.device);
  require_device("out", problem.out.device);
  require_f32("query", problem.q.dtype);
  require_f32("key", problem.k.dtype);
  require_f32("value", problem.v.dtype);
  require_f32("out", problem.out.dtype);
}

AttentionProblem CpuBackend::host(const AnyAttentionProblem& p) const {
  check_problem(p);
  return {as_float(p.q), as_float(p.k), as_float(p.v), as_float(p.out), p.scale, p.causal, p.prefix_length,
          p.query_offset};
}

void CpuBackend::exact_rows(const AnyAttentionProblem& problem, int row_begin, int row_end) const {
  exact_rows(host(problem), row_begin, row_end);
}

void CpuBackend::exact_rows(const AttentionProblem& problem, int row_begin, int row_end) const {
  check_problem(problem);
  kernels::exact_rows(target(), problem, row_begin, row_end, nullptr, 0, nullptr);
}

TileMass CpuBackend::exact_rows_with_tile_mass(const AttentionProblem& problem, int prefix, int block) const {
  check_problem(problem);
  TileMass mass;
  mass.block = block;
  kernels::exact_rows(target(), problem, problem.query_offset, problem.rows_end(), &mass, prefix, nullptr);
  return mass;
}

std::unique_ptr<const KeptTiles> CpuBackend::exact_rows_with_kept_tiles(const AnyAttentionProblem& problem, int prefix,
                                                                        int block, double keep_mass) const {
  const TileMass mass = exact_rows_with_tile_mass(host(problem), prefix, block);
  return std::make_unique<KeptTiles>(select_tiles(mass, problem.q.heads, keep_mass));
}

DenseLogits CpuBackend::exact_rows_with_dense_logits(const AnyAttentionProblem& problem, int prefix) const {
  return kernels::exact_rows_with_dense_logits(target(), host(problem), prefix);
}

void CpuBackend::sparse_rows(const AnyAttentionProblem& problem, int rows, const KeptTiles& kept) const {
  kernels::sparse_rows(target(), host(problem), rows, kept.tiles());
}

void CpuBackend::dense_echo_rows(const AnyAttentionProblem& problem, int rows, const DenseLogits& cached,
                                 float adjustment_strength, bool enable_jacobian) const {
  kernels::dense_echo_rows(target(), host(problem), rows, cached, adjustment_strength, enable_jacobian);
}

void CpuBackend::selected_rows(const AttentionProblem& problem, std::span<const int> rows,
                               const MutableHeadsView& result) const {
  check_problem(problem);
  require_device("result", result.device);
  kernels::selected_rows(target(), problem, rows, result);
}

double CpuBackend::max_row_error(const AnyAttentionProblem& problem, std::span<const int> rows) const {
  const AttentionProblem p = host(problem);
  const int heads = p.out.heads, dim = p.out.dim, count = static_cast<int>(rows.size());
  std::vector<float> exact(static_cast<std::size_t>(heads) * count * dim);
  selected_rows(p, rows, MutableHeadsView::contiguous(exact.data(), heads, count, dim));
  double worst = 0.0;
  for (int h = 0; h < heads; ++h) {
    double diff2 = 0.0, ref2 = 0.0;
    for (int r = 0; r < count; ++r) {
      const float* echo = p.out.row(h, rows[r]);
      const float* ref = exact.data() + (static_cast<std::size_t>(h) * count + r) * dim;
      for (int d = 0; d < dim; ++d) {
        const double e = double(echo[d]) - double(ref[d]);
        diff2 += e * e;
        ref2 += double(ref[d]) * ref[d];
      }
    }
    worst = std::max(worst, ref2 > 0.0 ? std::sqrt(diff2 / ref2) : std::sqrt(diff2));
  }
  return worst;
}

std::unique_ptr<PayloadBuffer> CpuBackend::allocate(std::size_t bytes) const {
  return std::make_unique<HostBuffer>(bytes);
}

void CpuBackend::copy_rows(const AnyHeadsView& src, const MutableAnyHeadsView& dst, int rows) const {
  require_device("src", src.device);
  require_device("dst", dst.device);
  require_f32("src", src.dtype);
  require_f32("dst", dst.dtype);
  if (dst.heads != src.heads || dst.dim != src.dim) throw_invalid("dst", "heads and dim must match src's");
  if (rows < 0 || rows > src.tokens || rows > dst.tokens) throw_invalid("rows", "must be in [0, min(src, dst tokens)]");
  const HeadsView from = as_float(src);
  const MutableHeadsView to = as_float(dst);
  for (int h = 0; h < src.heads; ++h)
    for (int t = 0; t < rows; ++t) std::memcpy(to.row(h, t), from.row(h, t), sizeof(float) * src.dim);
}

// Four independent multiply-xorshift lanes keep the loop at memory speed
// instead of one long dependency chain.
std::uint64_t CpuBackend::k_fingerprint(const AnyHeadsView& any_k, int prefix) const {
  require_device("key", any_k.device);
  require_f32("key", any_k.dtype);
  if (prefix < 0 || prefix > any_k.tokens) throw_invalid("prefix", "must be in [0, key tokens]");
  const HeadsView k = as_float(any_k);
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
