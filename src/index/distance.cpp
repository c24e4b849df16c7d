// The dot-product kernels. dot_rows is the brute-force scan's inner loop, so
// it gets its own kernel rather than a loop over dot.
#include "index/distance.hpp"

#include <immintrin.h>

#include "core/isa.hpp"

namespace attention_echo::index {
namespace {

// Horizontal sum; plain SSE so both SIMD paths can inline it.
float hsum(__m128 x) {
  x = _mm_add_ps(x, _mm_movehl_ps(x, x));
  return _mm_cvtss_f32(_mm_add_ss(x, _mm_shuffle_ps(x, x, 1)));
}

__attribute__((target("avx512f"))) float dot_avx512(const float* a, const float* b, int n) {
  // Four accumulators hide the FMA latency; a masked load takes the tail.
  __m512 acc[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(),
                   _mm512_setzero_ps()};
  int i = 0;
  for (; i + 64 <= n; i += 64)
    for (int j = 0; j < 4; ++j)
      acc[j] = _mm512_fmadd_ps(_mm512_loadu_ps(a + i + 16 * j), _mm512_loadu_ps(b + i + 16 * j),
                               acc[j]);
  for (; i < n; i += 16) {
    const __mmask16 m = n - i >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << (n - i)) - 1);
    acc[0] = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, a + i), _mm512_maskz_loadu_ps(m, b + i),
                             acc[0]);
  }
  // Fold the four 128-bit lanes. The masked forms (here and below) only
  // because the unmasked ones, and _mm512_reduce_add_ps, trip GCC 12's
  // -Wuninitialized on _mm512_undefined_ps.
  __m512 sum = _mm512_add_ps(_mm512_add_ps(acc[0], acc[1]), _mm512_add_ps(acc[2], acc[3]));
  sum = _mm512_add_ps(sum, _mm512_maskz_shuffle_f32x4(0xFFFF, sum, sum, _MM_SHUFFLE(1, 0, 3, 2)));
  sum = _mm512_add_ps(sum, _mm512_maskz_shuffle_f32x4(0xFFFF, sum, sum, _MM_SHUFFLE(2, 3, 0, 1)));
  return hsum(_mm512_mask_extractf32x4_ps(_mm_setzero_ps(), 0xF, sum, 0));
}

__attribute__((target("avx2,fma"))) float dot_avx2(const float* a, const float* b, int n) {
  __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(),
                   _mm256_setzero_ps()};
  int i = 0;
  for (; i + 32 <= n; i += 32)
    for (int j = 0; j < 4; ++j)
      acc[j] = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 8 * j), _mm256_loadu_ps(b + i + 8 * j),
                               acc[j]);
  const __m256 sum8 = _mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3]));
  float sum = hsum(_mm_add_ps(_mm256_castps256_ps128(sum8), _mm256_extractf128_ps(sum8, 1)));
  for (; i < n; ++i) sum += a[i] * b[i];
  return sum;
}

float dot_scalar(const float* a, const float* b, int n) {
  float sum = 0.0f;
  for (int i = 0; i < n; ++i) sum += a[i] * b[i];
  return sum;
}

// The brute-force scan. Four rows at a time share each query load and one
// combined horizontal reduction, which dominates a 128-float dot: per-row
// dot() calls ran ~2.5x slower.
__attribute__((target("avx512f"))) void dot_rows_avx512(const float* q, const float* rows,
                                                        std::size_t count, int dim, float* out) {
  std::size_t r = 0;
  for (; r + 4 <= count; r += 4) {
    const float* row = rows + r * dim;
    __m512 acc[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(),
                     _mm512_setzero_ps()};
    for (int i = 0; i < dim; i += 16) {
      const __mmask16 m = dim - i >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << (dim - i)) - 1);
      const __m512 qi = _mm512_maskz_loadu_ps(m, q + i);
      for (int j = 0; j < 4; ++j)
        acc[j] = _mm512_fmadd_ps(qi, _mm512_maskz_loadu_ps(m, row + j * dim + i), acc[j]);
    }
    // Per 128-bit lane: interleave-add pairs, then the four rows into one
    // vector of [row0, row1, row2, row3] partial sums; fold the four lanes.
    const __m512 t0 = _mm512_add_ps(_mm512_maskz_unpacklo_ps(0xFFFF, acc[0], acc[1]),
                                    _mm512_maskz_unpackhi_ps(0xFFFF, acc[0], acc[1]));
    const __m512 t1 = _mm512_add_ps(_mm512_maskz_unpacklo_ps(0xFFFF, acc[2], acc[3]),
                                    _mm512_maskz_unpackhi_ps(0xFFFF, acc[2], acc[3]));
    __m512 sum = _mm512_add_ps(_mm512_shuffle_ps(t0, t1, _MM_SHUFFLE(1, 0, 1, 0)),
                               _mm512_shuffle_ps(t0, t1, _MM_SHUFFLE(3, 2, 3, 2)));
    sum = _mm512_add_ps(sum, _mm512_maskz_shuffle_f32x4(0xFFFF, sum, sum, _MM_SHUFFLE(1, 0, 3, 2)));
    sum = _mm512_add_ps(sum, _mm512_maskz_shuffle_f32x4(0xFFFF, sum, sum, _MM_SHUFFLE(2, 3, 0, 1)));
    _mm_storeu_ps(out + r, _mm512_mask_extractf32x4_ps(_mm_setzero_ps(), 0xF, sum, 0));
  }
  for (; r < count; ++r) out[r] = dot_avx512(q, rows + r * dim, dim);
}

__attribute__((target("avx2,fma"))) void dot_rows_avx2(const float* q, const float* rows,
                                                      std::size_t count, int dim, float* out) {
  for (std::size_t r = 0; r < count; ++r) out[r] = dot_avx2(q, rows + r * dim, dim);
}

void dot_rows_scalar(const float* q, const float* rows, std::size_t count, int dim, float* out) {
  for (std::size_t r = 0; r < count; ++r) out[r] = dot_scalar(q, rows + r * dim, dim);
}

}  // namespace

DotKernels dot_kernels() {
  switch (active_isa()) {
    case Isa::kAvx512: return {dot_avx512, dot_rows_avx512};
    case Isa::kAvx2: return {dot_avx2, dot_rows_avx2};
    case Isa::kScalar: break;
  }
  return {dot_scalar, dot_rows_scalar};
}

}  // namespace attention_echo::index
