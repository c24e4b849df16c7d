// The tiled online-softmax loop over one RowBlock, written once against a
// small SIMD interface V and compiled per ISA: tile_loop_<isa>.cpp includes
// this header after its `#pragma GCC target`, so everything here is compiled
// for that ISA. It lives in an anonymous namespace and uses no std templates:
// an inline function compiled for AVX-512 must never be the copy the linker
// keeps for the scalar path.
//
// Layout (strides row_stride(rows) and dim_stride(dim); a vector holds W
// rows or W dims):
//   qt[d][r]   query r times logit_scale, transposed
//   s[j][r]    scores, then probabilities, of the chunk's key j
//   acc[r][d]  unnormalised output
// Scores run down the rows, so the row max, the exp and the row sum are
// vertical vector operations, and each row's arithmetic is the same whatever
// lane or block it lands in: that is what makes rows bit-identical across
// entry points and thread counts.
//
// Per row and chunk, in log2 units (s_j = log2(e) * scale * q.k_j):
//   m' = max(m, max_j s_j)      alpha = 2^(m - m')
//   p_j = 2^(s_j - m')          l' = alpha * l + sum_j p_j
//   acc' = alpha * acc + sum_j p_j v_j
// and out = acc / l after the last chunk. A key a row may not see gets
// s = -inf, so p = 0 exactly; a chunk a row cannot see at all leaves its
// m, l and acc bit for bit unchanged (alpha = 2^0 = 1 exactly).
//
// Score sources: s is computed from qt and the keys (exact, sparse, guard
// rows), and may be copied out on the way (a dense miss capturing its
// logits); or it is loaded from stored row-major logits, plus a per-key
// shift, by W x W transposes (a dense hit), and the queries and keys are
// never read. Everything after the scores is the same loop.
#pragma once

#include "kernels/row_block.hpp"

namespace attention_echo::kernels {
namespace {

constexpr float kNegInf = -__builtin_inff();

// 2^x for x <= 0: x = n + f with n = round(x), f in [-1/2, 1/2]; 2^f from
// Cephes' exp2f minimax polynomial (relative error ~2e-7), 2^n put into the
// exponent. Exactly 1 at x = 0; exactly 0 below -125, where a term is under
// 2^-125 of the row's largest and cannot move its sums.
template <class V>
typename V::reg exp2(typename V::reg x) {
  using Reg = typename V::reg;
  const Reg xc = V::max(x, V::set1(-125.0f));
  const Reg n = V::round(xc);
  const Reg f = V::sub(xc, n);
  Reg p = V::set1(1.535336188319500e-4f);
  p = V::mul_add(p, f, V::set1(1.339887440266574e-3f));
  p = V::mul_add(p, f, V::set1(9.618437357674640e-3f));
  p = V::mul_add(p, f, V::set1(5.550332471162809e-2f));
  p = V::mul_add(p, f, V::set1(2.402264791363012e-1f));
  p = V::mul_add(p, f, V::set1(6.931472028550421e-1f));
  p = V::mul_add(p, f, V::set1(1.0f));
  return V::zero_below(V::pow2_scale(p, n), x, -125.0f);
}

template <class V>
class TileLoop {
  using Reg = typename V::reg;
  static constexpr int W = V::W;
  static constexpr int kChains = 4;

 public:
  explicit TileLoop(const RowBlock& block)
      : b_(block),
        rows_(row_stride(block.rows)),
        lanes_(padded(block.rows)),
        dim_(block.dim),
        dpad_(dim_stride(block.dim)) {
    float* p = block.scratch;
    qt_ = p, p += dim_ * rows_;
    s_ = p, p += kChunk * rows_;
    acc_ = p, p += rows_ * dpad_;
    max_ = p, p += rows_;
    sum_ = p, p += rows_;
    alpha_ = p, p += rows_;
    key_end_ = p, p += rows_;
    vpad_ = p;
  }

  // Each step asks for the next one's keys or values while it computes, so
  // they stream in from L3 behind the arithmetic instead of stalling it.
  // With cached scores (dense echo) the step loads them instead of computing
  // q.k, and asks for the next step's cached scores instead of its keys.
  void run() {
    load_queries();
    for (int c = 0; c < b_.chunk_count; ++c) {
      prefetch(chunk_rows(b_.v, b_.v_pages, b_.v_stride, b_.chunks[c]), b_.v_stride, b_.chunks[c]);
      if (b_.cached != nullptr) {
        load_scores(b_.chunks[c]);
      } else {
        scores(b_.chunks[c]);
        if (b_.capture != nullptr) capture_scores(b_.chunks[c]);
      }
      softmax(b_.chunks[c], c);
      if (c + 1 < b_.chunk_count) {
        if (b_.cached != nullptr)
          prefetch_cached(b_.chunks[c + 1]);
        else
          prefetch(chunk_rows(b_.k, b_.k_pages, b_.k_stride, b_.chunks[c + 1]), b_.k_stride, b_.chunks[c + 1]);
      }
      accumulate(b_.chunks[c], c == 0);
    }
    finish();
  }

 private:
  // qt = logit_scale * q^T (pad rows zero), empty softmax state per row.
  // Whole W x W blocks go through V::transpose; the rest element by element.
  // Cached scores need no queries.
  void load_queries() {
    const int full_rows = b_.rows / W * W, full_dims = dim_ / W * W;
    for (int r = 0; r < full_rows && b_.cached == nullptr; r += W)
      for (int d = 0; d < full_dims; d += W) V::transpose(b_.q + r, d, b_.logit_scale, qt_ + d * rows_ + r, rows_);
    for (int r = 0; r < lanes_ && b_.cached == nullptr; ++r)
      for (int d = r < full_rows ? full_dims : 0; d < dim_; ++d)
        qt_[d * rows_ + r] = r < b_.rows ? b_.q[r][d] * b_.logit_scale : 0.0f;
    min_key_end_ = 3.0e38f;
    for (int r = 0; r < lanes_; ++r) {
      // Pad rows never get masked; their results are never read.
      key_end_[r] = r < b_.rows ? static_cast<float>(b_.key_end[r]) : 3.0e38f;
      if (key_end_[r] < min_key_end_) min_key_end_ = key_end_[r];
      max_[r] = kNegInf;
      sum_[r] = 0.0f;
    }
  }

  // The chunk's first key row of k or v (base, or its page when paged): the
  // chunk's other rows follow it `stride` apart.
  const float* chunk_rows(const float* base, const float* const* pages, std::ptrdiff_t stride,
                          const KeyChunk& chunk) const {
    if (pages == nullptr) return base + chunk.begin * stride;
    return pages[chunk.begin / b_.page_tokens] + (chunk.begin % b_.page_tokens) * stride;
  }

  // Requests the chunk's rows (first: chunk_rows) into L2.
  void prefetch(const float* first, std::ptrdiff_t stride, const KeyChunk& chunk) {
    for (int j = 0; j < chunk.end - chunk.begin; ++j)
      for (int d = 0; d < dim_; d += 16) __builtin_prefetch(first + j * stride + d, 0, 2);
  }

  // s[j][r] = sum_d qt[d][r] * k_j[d], RV row vectors x NK keys at a time.
  template <int RV, int NK>
  void score_tile(int rv, const float* k0, int j) {
    Reg a[RV][NK];
    const float* key[NK];
#pragma GCC unroll 16
    for (int n = 0; n < NK; ++n) {
      key[n] = k0 + (j + n) * b_.k_stride;
#pragma GCC unroll 16
      for (int i = 0; i < RV; ++i) a[i][n] = V::zero();
    }
    for (int d = 0; d < dim_; ++d) {
      const float* qd = qt_ + d * rows_ + rv * W;
      Reg q[RV];
#pragma GCC unroll 16
      for (int i = 0; i < RV; ++i) q[i] = V::load(qd + i * W);
#pragma GCC unroll 16
      for (int n = 0; n < NK; ++n) {
        const Reg kd = V::set1(key[n][d]);
#pragma GCC unroll 16
        for (int i = 0; i < RV; ++i) a[i][n] = V::mul_add(q[i], kd, a[i][n]);
      }
    }
#pragma GCC unroll 16
    for (int n = 0; n < NK; ++n)
#pragma GCC unroll 16
      for (int i = 0; i < RV; ++i) V::store(s_ + (j + n) * rows_ + (rv + i) * W, a[i][n]);
  }

  template <int RV>
  void score_rows(int rv, const float* k0, int keys) {
    constexpr int NK = V::kScoreKeys;
    static_assert(kChunk % NK == 0, "full chunks take whole micro-tiles");
    int j = 0;
    for (; j + NK <= keys; j += NK) score_tile<RV, NK>(rv, k0, j);
    for (; j < keys; ++j) score_tile<RV, 1>(rv, k0, j);
  }

  void scores(const KeyChunk& chunk) {
    const float* k0 = chunk_rows(b_.k, b_.k_pages, b_.k_stride, chunk);
    const int keys = chunk.end - chunk.begin;
    const int vectors = lanes_ / W;
    int rv = 0;
    for (; rv + V::kScoreRows <= vectors; rv += V::kScoreRows) score_rows<V::kScoreRows>(rv, k0, keys);
    for (; rv < vectors; ++rv) score_rows<1>(rv, k0, keys);
  }

  // s[j][r] = cached_scale * cached[r][begin + j] + shift[begin + j] (pad
  // rows 0): the stored row-major scores transposed W x W blocks at a time,
  // the ragged edges element by element.
  void load_scores(const KeyChunk& chunk) {
    const int keys = chunk.end - chunk.begin;
    const int full_rows = b_.rows / W * W, full_keys = keys / W * W;
    for (int r = 0; r < full_rows; r += W)
      for (int j = 0; j < full_keys; j += W)
        V::transpose(b_.cached + r, chunk.begin + j, b_.cached_scale, s_ + j * rows_ + r, rows_);
    for (int r = 0; r < lanes_; ++r)
      for (int j = r < full_rows ? full_keys : 0; j < keys; ++j)
        s_[j * rows_ + r] = r < b_.rows ? b_.cached[r][chunk.begin + j] * b_.cached_scale : 0.0f;
    if (b_.cached_shift == nullptr) return;
    for (int j = 0; j < keys; ++j) {
      const Reg u = V::set1(b_.cached_shift[chunk.begin + j]);
      float* s = s_ + j * rows_;
      for (int r = 0; r < lanes_; r += W) V::store(s + r, V::add(V::load(s + r), u));
    }
  }

  // Requests the chunk's cached scores of every row into L2.
  void prefetch_cached(const KeyChunk& chunk) {
    for (int r = 0; r < b_.rows; ++r)
      for (int j = chunk.begin; j < chunk.end; j += 16) __builtin_prefetch(b_.cached[r] + j, 0, 2);
  }

  // capture[r][begin + j] = capture_scale * s[j][r] for the keys row r sees:
  // W x W blocks of s transposed into a row-major tile, each of its rows
  // stored cut at the row's key_end.
  void capture_scores(const KeyChunk& chunk) {
    const int keys = chunk.end - chunk.begin;
    float tile[W * W];
    const float* src[W];
    for (int r = 0; r < b_.rows; r += W) {
      const int nr = b_.rows - r < W ? b_.rows - r : W;
      for (int j = 0; j < keys; j += W) {
        const int nk = keys - j < W ? keys - j : W;
        if (nr == W && nk == W) {
          for (int i = 0; i < W; ++i) src[i] = s_ + (j + i) * rows_;
          V::transpose(src, r, b_.capture_scale, tile, W);
        } else {
          for (int k = 0; k < nr; ++k)
            for (int i = 0; i < nk; ++i) tile[k * W + i] = s_[(j + i) * rows_ + r + k] * b_.capture_scale;
        }
        for (int k = 0; k < nr; ++k) {
          float* dst = b_.capture[r + k];
          const int key = chunk.begin + j, seen = b_.key_end[r + k] - key;
          if (dst == nullptr || seen <= 0) continue;
          if (seen >= W && nk == W)
            V::store(dst + key, V::load(tile + k * W));
          else
            for (int i = 0; i < nk && i < seen; ++i) dst[key + i] = tile[k * W + i];
        }
      }
    }
  }

  // Masks keys past each row's key_end, updates m and l, turns scores into
  // probabilities and leaves each row's alpha for accumulate(). Max and sums
  // run as kChains independent chains (key j in chain j % kChains) to hide
  // their latency, sums one segment at a time (tile mass logs them). Keys a
  // row cannot see add exact zeros, so its sums do not depend on how far its
  // block's chunk reaches.
  void softmax(const KeyChunk& chunk, int c) {
    const int keys = chunk.end - chunk.begin;
    const bool mask = static_cast<float>(chunk.end) > min_key_end_;
    for (int r = 0; r < lanes_; r += W) {
      if (mask) mask_keys(chunk, r);
      const Reg m_old = V::load(max_ + r);
      Reg m_chain[kChains] = {m_old, m_old, m_old, m_old};
      // The score second: max gives its second operand when either is NaN,
      // so a NaN score (an overflowed q.k) is passed over, the max is never
      // NaN, and it does not depend on which masked keys follow in a chain
      // (exp2 then makes that score's p exactly 0, as a masked key's).
      for (int j = 0; j < keys; ++j) m_chain[j % kChains] = V::max(V::load(s_ + j * rows_ + r), m_chain[j % kChains]);
      const Reg m = V::max(V::max(m_chain[0], m_chain[1]), V::max(m_chain[2], m_chain[3]));
      // A row that has seen no key yet keeps m = -inf; 0 stands in for it so
      // that 2^(-inf - 0) = 0 rather than NaN. Where the max did not move,
      // alpha is 1 exactly, also at m = +inf (where 2^(inf - inf) would zero
      // the row): a chunk a row cannot see leaves it as it was, which keeps
      // rows bit-identical across blocks even when their logits overflow
      // (found by fuzz_cache_request: an exact hit's rows past the prefix,
      // blocked from another row, read 0 where a miss read NaN).
      const Reg m_ref = V::finite_or_zero(m);
      const Reg alpha = V::one_where_equal(exp2<V>(V::sub(m_old, m_ref)), m, m_old);
      Reg total = V::zero();
      for (int g = 0; g < kChunk / kSegment; ++g) {
        const Reg segment = exponentiate(g * kSegment, keys, r, m_ref);
        total = V::add(total, segment);
        if (b_.log.segment_sum != nullptr)
          V::store(b_.log.segment_sum + (c * (kChunk / kSegment) + g) * rows_ + r, segment);
      }
      V::store(max_ + r, m);
      V::store(alpha_ + r, alpha);
      V::store(sum_ + r, V::mul_add(V::load(sum_ + r), alpha, total));
      if (b_.log.chunk_max != nullptr) V::store(b_.log.chunk_max + c * rows_ + r, m_ref);
    }
  }

  // p = 2^(s - m_ref) in place for keys [first, min(first + kSegment, keys));
  // returns their sum.
  Reg exponentiate(int first, int keys, int r, Reg m_ref) {
    Reg chain[kChains] = {V::zero(), V::zero(), V::zero(), V::zero()};
    const int last = first + kSegment < keys ? first + kSegment : keys;
    for (int j = first; j < last; ++j) {
      float* s = s_ + j * rows_ + r;
      const Reg p = exp2<V>(V::sub(V::load(s), m_ref));
      V::store(s, p);
      chain[j % kChains] = V::add(chain[j % kChains], p);
    }
    return V::add(V::add(chain[0], chain[1]), V::add(chain[2], chain[3]));
  }

  // s = -inf where the key is at or past the row's key_end.
  void mask_keys(const KeyChunk& chunk, int r) {
    const Reg key_end = V::load(key_end_ + r);
    for (int j = 0; j < chunk.end - chunk.begin; ++j) {
      float* s = s_ + j * rows_ + r;
      V::store(s, V::keep_below(V::load(s), key_end, static_cast<float>(chunk.begin + j)));
    }
  }

  // acc[r] = alpha_r * acc[r] + sum_j p_rj v_j for MR rows x SW dim vectors;
  // the first chunk starts from acc = 0 (its alpha is 0) without reading it.
  template <int MR, int SW>
  void value_tile(int r, int dv, const float* v0, std::ptrdiff_t v_stride, int keys, bool first) {
    Reg a[MR][SW];
#pragma GCC unroll 16
    for (int i = 0; i < MR; ++i) {
      const Reg alpha = V::set1(alpha_[r + i]);
#pragma GCC unroll 16
      for (int s = 0; s < SW; ++s)
        a[i][s] = first ? V::zero() : V::mul(V::load(acc_ + (r + i) * dpad_ + (dv + s) * W), alpha);
    }
    for (int j = 0; j < keys; ++j) {
      const float* vj = v0 + j * v_stride + dv * W;
      Reg p[MR];
#pragma GCC unroll 16
      for (int i = 0; i < MR; ++i) p[i] = V::set1(s_[j * rows_ + r + i]);
#pragma GCC unroll 16
      for (int s = 0; s < SW; ++s) {
        const Reg x = V::load(vj + s * W);
#pragma GCC unroll 16
        for (int i = 0; i < MR; ++i) a[i][s] = V::mul_add(p[i], x, a[i][s]);
      }
    }
#pragma GCC unroll 16
    for (int i = 0; i < MR; ++i)
#pragma GCC unroll 16
      for (int s = 0; s < SW; ++s) V::store(acc_ + (r + i) * dpad_ + (dv + s) * W, a[i][s]);
  }

  // Rows [r, rows) in tiles of MR rows, the rest in smaller tiles.
  template <int MR, int SW>
  void value_rows(int r, const float* v0, std::ptrdiff_t v_stride, int dv, int keys, bool first) {
    for (; r + MR <= b_.rows; r += MR) value_tile<MR, SW>(r, dv, v0, v_stride, keys, first);
    if constexpr (MR > 1) value_rows<MR / 2, SW>(r, v0, v_stride, dv, keys, first);
  }

  template <int SW>
  void value_strip(int dv, const float* v0, std::ptrdiff_t v_stride, int keys, bool first) {
    value_rows<V::kValueAcc / SW, SW>(0, v0, v_stride, dv, keys, first);
  }

  void accumulate(const KeyChunk& chunk, bool first) {
    const int keys = chunk.end - chunk.begin;
    const float* v0 = chunk_rows(b_.v, b_.v_pages, b_.v_stride, chunk);
    std::ptrdiff_t v_stride = b_.v_stride;
    if (dim_ % W != 0) {
      // Whole vectors only: copy the chunk's values into zero-padded rows.
      for (int j = 0; j < keys; ++j)
        for (int d = 0; d < dpad_; ++d) vpad_[j * dpad_ + d] = d < dim_ ? v0[j * v_stride + d] : 0.0f;
      v0 = vpad_;
      v_stride = dpad_;
    }
    static_assert(V::kValueStrip <= 8, "value_strip is instantiated up to 8 vectors");
    const int vectors = (dim_ + W - 1) / W;
    for (int dv = 0; dv < vectors; dv += V::kValueStrip) {
      switch (vectors - dv < V::kValueStrip ? vectors - dv : V::kValueStrip) {
        case 1: value_strip<1>(dv, v0, v_stride, keys, first); break;
        case 2: value_strip<2>(dv, v0, v_stride, keys, first); break;
        case 3: value_strip<3>(dv, v0, v_stride, keys, first); break;
        case 4: value_strip<4>(dv, v0, v_stride, keys, first); break;
        case 5: value_strip<5>(dv, v0, v_stride, keys, first); break;
        case 6: value_strip<6>(dv, v0, v_stride, keys, first); break;
        case 7: value_strip<7>(dv, v0, v_stride, keys, first); break;
        default: value_strip<8>(dv, v0, v_stride, keys, first); break;
      }
    }
  }

  // out = acc / l; a row that saw no key at all (l = 0) gets zeros.
  void finish() {
    for (int r = 0; r < b_.rows; ++r) {
      float* out = b_.out[r];
      if (!(sum_[r] > 0.0f)) {
        for (int d = 0; d < dim_; ++d) out[d] = 0.0f;
        continue;
      }
      const Reg inv = V::set1(1.0f / sum_[r]);
      const float* acc = acc_ + r * dpad_;
      int d = 0;
      for (; d + W <= dim_; d += W) V::store(out + d, V::mul(V::load(acc + d), inv));
      if (d < dim_) V::store_n(out + d, V::mul(V::load(acc + d), inv), dim_ - d);
    }
    if (b_.log.row_max != nullptr)
      for (int r = 0; r < b_.rows; ++r) {
        b_.log.row_max[r] = max_[r] == kNegInf ? 0.0f : max_[r];
        b_.log.row_sum[r] = sum_[r];
      }
  }

  const RowBlock& b_;
  const int rows_, lanes_, dim_, dpad_;  // row stride, padded rows, dim, dim stride
  float min_key_end_ = 0.0f;
  float *qt_, *s_, *acc_, *max_, *sum_, *alpha_, *key_end_, *vpad_;
};

}  // namespace
}  // namespace attention_echo::kernels
