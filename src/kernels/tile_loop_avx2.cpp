// The tile loop compiled for AVX2 + FMA: 8 floats a vector, 16 registers.
#include <immintrin.h>

#include "kernels/row_block.hpp"

#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,fma"))), apply_to = function)
#else
#pragma GCC target("avx2,fma")
#endif

namespace attention_echo::kernels {
namespace {

struct Avx2 {
  using reg = __m256;
  static constexpr int W = 8;
  static constexpr int kScoreRows = 2;   // row vectors x keys per score micro-tile
  static constexpr int kScoreKeys = 4;
  static constexpr int kValueAcc = 12;    // accumulators per value micro-tile,
  static constexpr int kValueStrip = 4;   // of this many dim vectors per row

  static reg zero() { return _mm256_setzero_ps(); }
  static reg set1(float x) { return _mm256_set1_ps(x); }
  static reg load(const float* p) { return _mm256_loadu_ps(p); }
  static void store(float* p, reg x) { _mm256_storeu_ps(p, x); }
  static void store_n(float* p, reg x, int n) {
    const __m256i lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    _mm256_maskstore_ps(p, _mm256_cmpgt_epi32(_mm256_set1_epi32(n), lanes), x);
  }
  static reg mul_add(reg a, reg b, reg c) { return _mm256_fmadd_ps(a, b, c); }
  static reg mul(reg a, reg b) { return _mm256_mul_ps(a, b); }
  static reg add(reg a, reg b) { return _mm256_add_ps(a, b); }
  static reg sub(reg a, reg b) { return _mm256_sub_ps(a, b); }
  static reg max(reg a, reg b) { return _mm256_max_ps(a, b); }
  static reg round(reg x) { return _mm256_round_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
  // p * 2^n by adding n to the exponent field; exp2 keeps n in [-125, 0] and
  // p in [0.7, 1.5], so the result stays a normal float.
  static reg pow2_scale(reg p, reg n) {
    const __m256i e = _mm256_slli_epi32(_mm256_cvtps_epi32(n), 23);
    return _mm256_castsi256_ps(_mm256_add_epi32(_mm256_castps_si256(p), e));
  }
  static reg zero_below(reg r, reg x, float limit) {
    return _mm256_and_ps(r, _mm256_cmp_ps(x, set1(limit), _CMP_GE_OQ));
  }
  static reg keep_below(reg s, reg key_end, float key) {
    return _mm256_blendv_ps(set1(-__builtin_inff()), s, _mm256_cmp_ps(set1(key), key_end, _CMP_LT_OQ));
  }
  // r, and 1 where a == b.
  static reg one_where_equal(reg r, reg a, reg b) {
    return _mm256_blendv_ps(r, set1(1.0f), _mm256_cmp_ps(a, b, _CMP_EQ_OQ));
  }
  static reg finite_or_zero(reg m) {
    return _mm256_andnot_ps(_mm256_cmp_ps(m, set1(-__builtin_inff()), _CMP_EQ_OQ), m);
  }
  // dst[k * stride + i] = scale * rows[i][d + k] for an 8 x 8 block: pairs
  // interleaved, then 4 x 4 blocks within 128-bit lanes, then lanes swapped.
  static void transpose(const float* const* rows, int d, float scale, float* dst, int stride) {
    reg a[8], t[8], u[8];
    for (int i = 0; i < 8; ++i) a[i] = mul(load(rows[i] + d), set1(scale));
    for (int i = 0; i < 8; i += 2) {
      t[i] = _mm256_unpacklo_ps(a[i], a[i + 1]);
      t[i + 1] = _mm256_unpackhi_ps(a[i], a[i + 1]);
    }
    for (int i = 0; i < 8; i += 4) {
      u[i] = _mm256_shuffle_ps(t[i], t[i + 2], 0x44);
      u[i + 1] = _mm256_shuffle_ps(t[i], t[i + 2], 0xee);
      u[i + 2] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0x44);
      u[i + 3] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0xee);
    }
    for (int k = 0; k < 4; ++k) {
      store(dst + k * stride, _mm256_permute2f128_ps(u[k], u[k + 4], 0x20));
      store(dst + (k + 4) * stride, _mm256_permute2f128_ps(u[k], u[k + 4], 0x31));
    }
  }
};

}  // namespace
}  // namespace attention_echo::kernels

#include "kernels/tile_loop.hpp"

namespace attention_echo::kernels {

void run_block_avx2(const RowBlock& block) { TileLoop<Avx2>(block).run(); }

}  // namespace attention_echo::kernels

#if defined(__clang__)
#pragma clang attribute pop
#endif
