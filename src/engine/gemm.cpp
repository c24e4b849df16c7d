#include "engine/gemm.hpp"

#include <immintrin.h>

#include <algorithm>
#include <array>
#include <utility>

namespace attention_echo::llama {
namespace {

// Register-blocked micro-kernels: MR rows of x times one panel, every
// accumulator in a register for the whole k loop. AVX-512: 8 rows x 32
// columns = 16 zmm accumulators; AVX2: 6 rows x 16 columns = 12 ymm.
template <int MR>
__attribute__((target("avx512f"))) void micro_avx512(const float* x, std::size_t ldx, const float* p,
                                                     int k, float* y, std::size_t ldy, int cols,
                                                     bool accumulate) {
  __m512 c0[MR], c1[MR];
  for (int r = 0; r < MR; ++r) c0[r] = c1[r] = _mm512_setzero_ps();
  for (int i = 0; i < k; ++i, p += 32) {
    const __m512 b0 = _mm512_loadu_ps(p), b1 = _mm512_loadu_ps(p + 16);
    for (int r = 0; r < MR; ++r) {
      const __m512 a = _mm512_set1_ps(x[r * ldx + i]);
      c0[r] = _mm512_fmadd_ps(a, b0, c0[r]);
      c1[r] = _mm512_fmadd_ps(a, b1, c1[r]);
    }
  }
  const __mmask16 m0 = static_cast<__mmask16>(cols >= 16 ? 0xffff : (1u << cols) - 1);
  const __mmask16 m1 = static_cast<__mmask16>(cols >= 32 ? 0xffff : cols <= 16 ? 0 : (1u << (cols - 16)) - 1);
  for (int r = 0; r < MR; ++r) {
    float* out = y + r * ldy;
    if (accumulate) {
      c0[r] = _mm512_add_ps(c0[r], _mm512_maskz_loadu_ps(m0, out));
      c1[r] = _mm512_add_ps(c1[r], _mm512_maskz_loadu_ps(m1, out + 16));
    }
    _mm512_mask_storeu_ps(out, m0, c0[r]);
    _mm512_mask_storeu_ps(out + 16, m1, c1[r]);
  }
}

template <int MR>
__attribute__((target("avx2,fma"))) void micro_avx2(const float* x, std::size_t ldx, const float* p, int k,
                                                    float* y, std::size_t ldy, int cols, bool accumulate) {
  __m256 c0[MR], c1[MR];
  for (int r = 0; r < MR; ++r) c0[r] = c1[r] = _mm256_setzero_ps();
  for (int i = 0; i < k; ++i, p += 16) {
    const __m256 b0 = _mm256_loadu_ps(p), b1 = _mm256_loadu_ps(p + 8);
    for (int r = 0; r < MR; ++r) {
      const __m256 a = _mm256_broadcast_ss(x + r * ldx + i);
      c0[r] = _mm256_fmadd_ps(a, b0, c0[r]);
      c1[r] = _mm256_fmadd_ps(a, b1, c1[r]);
    }
  }
  for (int r = 0; r < MR; ++r) {
    alignas(32) float tmp[16];
    _mm256_store_ps(tmp, c0[r]);
    _mm256_store_ps(tmp + 8, c1[r]);
    float* out = y + r * ldy;
    for (int j = 0; j < cols; ++j) out[j] = accumulate ? out[j] + tmp[j] : tmp[j];
  }
}

// Portable fallback; the compiler vectorises the j loop.
template <int MR>
void micro_scalar(const float* x, std::size_t ldx, const float* p, int k, float* y, std::size_t ldy,
                  int cols, bool accumulate) {
  float c[MR][16] = {};
  for (int i = 0; i < k; ++i, p += 16)
    for (int r = 0; r < MR; ++r)
      for (int j = 0; j < 16; ++j) c[r][j] += x[r * ldx + i] * p[j];
  for (int r = 0; r < MR; ++r)
    for (int j = 0; j < cols; ++j) y[r * ldy + j] = accumulate ? y[r * ldy + j] + c[r][j] : c[r][j];
}

using Micro = void (*)(const float*, std::size_t, const float*, int, float*, std::size_t, int, bool);

// Micro-kernels for 1..MR rows, indexed by rows - 1.
template <int... R>
constexpr std::array<Micro, sizeof...(R)> avx512_table(std::integer_sequence<int, R...>) {
  return {&micro_avx512<R + 1>...};
}
template <int... R>
constexpr std::array<Micro, sizeof...(R)> avx2_table(std::integer_sequence<int, R...>) {
  return {&micro_avx2<R + 1>...};
}
template <int... R>
constexpr std::array<Micro, sizeof...(R)> scalar_table(std::integer_sequence<int, R...>) {
  return {&micro_scalar<R + 1>...};
}

struct Kernel {
  int panel;
  int mr;
  const Micro* micro;  // micro[rows - 1]
};

Kernel kernel_for(Isa isa) {
  static constexpr auto k512 = avx512_table(std::make_integer_sequence<int, 8>{});
  static constexpr auto k2 = avx2_table(std::make_integer_sequence<int, 6>{});
  static constexpr auto k1 = scalar_table(std::make_integer_sequence<int, 4>{});
  switch (isa) {
    case Isa::kAvx512: return {32, 8, k512.data()};
    case Isa::kAvx2: return {16, 6, k2.data()};
    case Isa::kScalar: break;
  }
  return {16, 4, k1.data()};
}

}  // namespace

PackedMatrix pack(const float* w, int rows, int cols, Isa isa) {
  PackedMatrix out;
  out.rows = rows;
  out.cols = cols;
  out.isa = isa;
  out.panel = kernel_for(isa).panel;
  const int panels = (rows + out.panel - 1) / out.panel;
  out.data.assign(static_cast<std::size_t>(panels) * cols * out.panel, 0.0f);
  for (int r = 0; r < rows; ++r) {
    float* panel = out.data.data() + static_cast<std::size_t>(r / out.panel) * cols * out.panel;
    for (int c = 0; c < cols; ++c) panel[static_cast<std::size_t>(c) * out.panel + r % out.panel] = w[static_cast<std::size_t>(r) * cols + c];
  }
  return out;
}

void gemm(const float* x, std::size_t ldx, int m, const PackedMatrix& w, float* y, std::size_t ldy,
          bool accumulate, ThreadPool& pool) {
  if (m <= 0) return;
  const Kernel kernel = kernel_for(w.isa);
  const int panels = (w.rows + w.panel - 1) / w.panel;
  // Tasks are (row block, panel group): a panel group (<= 4 panels, ~100 KB)
  // stays in L2 while the row block's micro-tiles stream past it.
  constexpr int kRowBlock = 48;
  const int row_blocks = (m + kRowBlock - 1) / kRowBlock;
  const int group = row_blocks >= 2 * pool.size() ? 4 : 1;
  const int groups = (panels + group - 1) / group;
  pool.parallel_for(static_cast<std::size_t>(row_blocks) * groups, [&](std::size_t task) {
    const int r0 = static_cast<int>(task / groups) * kRowBlock;
    const int r1 = std::min(m, r0 + kRowBlock);
    const int p0 = static_cast<int>(task % groups) * group;
    const int p1 = std::min(panels, p0 + group);
    for (int p = p0; p < p1; ++p) {
      const float* panel = w.data.data() + static_cast<std::size_t>(p) * w.cols * w.panel;
      const int col0 = p * w.panel;
      const int cols = std::min(w.panel, w.rows - col0);
      for (int r = r0; r < r1; r += kernel.mr) {
        const int rows = std::min(kernel.mr, r1 - r);
        kernel.micro[rows - 1](x + r * ldx, ldx, panel, w.cols, y + r * ldy + col0, ldy, cols, accumulate);
      }
    }
  });
}

}  // namespace attention_echo::llama
