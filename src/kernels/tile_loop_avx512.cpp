// The tile loop compiled for AVX-512F: 16 floats a vector, 32 registers.
#include <immintrin.h>

#include "kernels/row_block.hpp"

// GCC 12's AVX-512 intrinsics merge into _mm512_undefined_ps(), which
// -Wmaybe-uninitialized flags at every inlined use (GCC bug 105593).
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx512f,avx2,fma"))), apply_to = function)
#else
#pragma GCC target("avx512f,avx2,fma")
#endif

namespace attention_echo::kernels {
namespace {

struct Avx512 {
  using reg = __m512;
  static constexpr int W = 16;
  static constexpr int kScoreRows = 2;   // row vectors x keys per score micro-tile
  static constexpr int kScoreKeys = 8;
  static constexpr int kValueAcc = 16;    // accumulators per value micro-tile,
  static constexpr int kValueStrip = 4;   // of this many dim vectors per row

  static reg zero() { return _mm512_setzero_ps(); }
  static reg set1(float x) { return _mm512_set1_ps(x); }
  static reg load(const float* p) { return _mm512_loadu_ps(p); }
  static void store(float* p, reg x) { _mm512_storeu_ps(p, x); }
  static void store_n(float* p, reg x, int n) {
    _mm512_mask_storeu_ps(p, static_cast<__mmask16>((1u << n) - 1), x);
  }
  static reg mul_add(reg a, reg b, reg c) { return _mm512_fmadd_ps(a, b, c); }
  static reg mul(reg a, reg b) { return _mm512_mul_ps(a, b); }
  static reg add(reg a, reg b) { return _mm512_add_ps(a, b); }
  static reg sub(reg a, reg b) { return _mm512_sub_ps(a, b); }
  static reg max(reg a, reg b) { return _mm512_max_ps(a, b); }
  static reg round(reg x) { return _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
  static reg pow2_scale(reg p, reg n) { return _mm512_scalef_ps(p, n); }
  static reg zero_below(reg r, reg x, float limit) {
    return _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(x, set1(limit), _CMP_GE_OQ), r);
  }
  static reg keep_below(reg s, reg key_end, float key) {
    return _mm512_mask_blend_ps(_mm512_cmp_ps_mask(set1(key), key_end, _CMP_LT_OQ), set1(-__builtin_inff()), s);
  }
  // r, and 1 where a == b.
  static reg one_where_equal(reg r, reg a, reg b) {
    return _mm512_mask_blend_ps(_mm512_cmp_ps_mask(a, b, _CMP_EQ_OQ), r, set1(1.0f));
  }
  static reg finite_or_zero(reg m) {
    return _mm512_mask_blend_ps(_mm512_cmp_ps_mask(m, set1(-__builtin_inff()), _CMP_EQ_OQ), m, zero());
  }
  // dst[k * stride + i] = scale * rows[i][d + k] for a 16 x 16 block: pairs
  // of rows interleaved, then pairs of pairs, then 128-bit lanes regrouped
  // twice. After step 2, u[4i + k] holds, in lane L, column 4L + k of rows
  // 4i .. 4i + 3.
  static void transpose(const float* const* rows, int d, float scale, float* dst, int stride) {
    reg a[16], t[16], u[16];
    for (int i = 0; i < 16; ++i) a[i] = mul(load(rows[i] + d), set1(scale));
    for (int i = 0; i < 16; i += 2) {
      t[i] = _mm512_unpacklo_ps(a[i], a[i + 1]);
      t[i + 1] = _mm512_unpackhi_ps(a[i], a[i + 1]);
    }
    for (int i = 0; i < 16; i += 4)
      for (int k = 0; k < 2; ++k) {
        const __m512d lo = _mm512_castps_pd(t[i + k]), hi = _mm512_castps_pd(t[i + k + 2]);
        u[i + 2 * k] = _mm512_castpd_ps(_mm512_unpacklo_pd(lo, hi));
        u[i + 2 * k + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(lo, hi));
      }
    for (int k = 0; k < 4; ++k) {
      const reg even = _mm512_shuffle_f32x4(u[k], u[4 + k], 0x88), odd = _mm512_shuffle_f32x4(u[k], u[4 + k], 0xdd);
      const reg even2 = _mm512_shuffle_f32x4(u[8 + k], u[12 + k], 0x88);
      const reg odd2 = _mm512_shuffle_f32x4(u[8 + k], u[12 + k], 0xdd);
      store(dst + k * stride, _mm512_shuffle_f32x4(even, even2, 0x88));
      store(dst + (8 + k) * stride, _mm512_shuffle_f32x4(even, even2, 0xdd));
      store(dst + (4 + k) * stride, _mm512_shuffle_f32x4(odd, odd2, 0x88));
      store(dst + (12 + k) * stride, _mm512_shuffle_f32x4(odd, odd2, 0xdd));
    }
  }
};

}  // namespace
}  // namespace attention_echo::kernels

#include "kernels/tile_loop.hpp"

namespace attention_echo::kernels {

void run_block_avx512(const RowBlock& block) { TileLoop<Avx512>(block).run(); }

}  // namespace attention_echo::kernels

#if defined(__clang__)
#pragma clang attribute pop
#endif
