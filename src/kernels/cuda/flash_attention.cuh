// The attention kernel: FlashAttention-2 on mma.sync m16n8k16 tensor-core
// instructions (fp16/bf16 operands, fp32 accumulators), for head dims 64 and
// 128. A thread block owns kRowsPerBlock query rows of one head (4 warps of
// 32 rows); it streams 64-key chunks of K and V through two shared-memory
// stages (cp.async: the next chunk loads while this one computes) and keeps
// the online-softmax state and the output rows in registers (at D = 128 ptxas
// spills about 100 bytes a thread: the measured rate includes that).
//
// Per row, in log2 units (s = log2(e) * scale * q.k):
//   m' = max(m, max_j s_j), alpha = 2^(m_ref - m'_ref), p_j = 2^(s_j - m'_ref),
//   l' = alpha l + sum_j p_j, o' = alpha o + sum_j p_j v_j, out = o / l,
// where m_ref is m, or 0 while m is -inf (a row that has seen no key yet), so
// masked keys give p = 0 exactly and a chunk a row cannot see leaves its state
// bit for bit unchanged.
//
// Tile mass (kMass): per row and key tile J the sum of p over J's keys,
// relative to the running max of its time, is written out as a log2 partial
// L = m_ref + log2(sum); a second kernel turns L and the row's final
// log-sum-exp into the mean mass of (query tile, key tile). The output bits
// do not depend on kMass.
//
// Key chunks: every chunk below the block's key limit; a warp computes only
// chunks that start below its rows' key end. The sparse hit's walk over a
// plan's chunks is sparse_hopper.cuh's kernel, on wgmma.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

namespace attention_echo::kernels::cuda::detail {

// Each warp owns kWarpTiles m16 tiles of query rows; a block is 128 rows.
// Two tiles (4 warps, two blocks per multiprocessor) share every K and V
// fragment a warp reads from shared memory between two tiles' MMAs: 271
// TFLOP/s at T = 32k against 239 with one tile and 8 warps (H200,
// docs/cuda/NOTES.md).
inline constexpr int kWarpTiles = 2;
inline constexpr int kWarps = 8 / kWarpTiles;
inline constexpr int kWarpRows = 16 * kWarpTiles;
inline constexpr int kBlockRows = kWarps * kWarpRows;
inline constexpr int kChunkKeys = 64;
inline constexpr int kThreads = kWarps * 32;
// A thread's rows: g, g + 8 of each m16 tile (g = lane / 4).
inline constexpr int kThreadRows = 2 * kWarpTiles;

struct KernelParams {
  const void* q;
  const void* k;
  const void* v;
  void* out;
  std::int64_t q_head_stride, q_token_stride;
  std::int64_t k_head_stride, k_token_stride;
  std::int64_t v_head_stride, v_token_stride;
  std::int64_t out_head_stride, out_token_stride;
  int group;         // query heads per kv head
  int tokens;        // T
  int query_offset;  // first row (position) q holds
  int row_end;       // one past the last row to compute
  int causal;
  int prefix_length;
  float scale_log2;  // scale * log2(e)
  // Sparse walk (sparse_hopper.cuh only): entries of (head, block) are
  // plan_entries[plan_offsets[head * plan_head_stride + block] ..], each chunk | warp bits << 16,
  // a bit per kWarpRows rows of the block's kBlockRows.
  const std::uint32_t* plan_offsets;
  const std::uint32_t* plan_entries;
  // Row blocks per head in the plan (>= the grid's when fewer rows are
  // served); 0: one plan serves every head.
  int plan_head_stride;
  // Tile mass (kMass here and in sparse_hopper.cuh, whose tiles are its
  // 64-key chunks): mass_log[(head * mass_tiles + J) * mass_prefix + row],
  // row_lse[head * mass_prefix + row] (natural log), rows < mass_prefix.
  // sparse_hopper.cuh writes row_lse wherever it is not null.
  float* mass_log;
  float* row_lse;
  int mass_prefix;
  int mass_block;
  int mass_tiles;
};

template <typename T>
struct Mma;

template <>
struct Mma<__nv_bfloat16> {
  __device__ static std::uint32_t pack(float lo, float hi) {
    __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<std::uint32_t*>(&v);
  }
  __device__ static void run(float (&c)[4], const std::uint32_t (&a)[4], std::uint32_t b0, std::uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
};

template <>
struct Mma<__half> {
  __device__ static std::uint32_t pack(float lo, float hi) {
    __half2 v = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<std::uint32_t*>(&v);
  }
  __device__ static void run(float (&c)[4], const std::uint32_t (&a)[4], std::uint32_t b0, std::uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
};

__device__ __forceinline__ float fast_exp2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

__device__ __forceinline__ void cp_async16(void* smem, const void* gmem, bool valid) {
  const unsigned dst = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(gmem), "r"(valid ? 16 : 0));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
__device__ __forceinline__ void cp_async_wait_all() { asm volatile("cp.async.wait_group 0;\n" ::); }
__device__ __forceinline__ void cp_async_wait_one() { asm volatile("cp.async.wait_group 1;\n" ::); }

__device__ __forceinline__ void ldmatrix_x4(std::uint32_t (&r)[4], const void* smem) {
  const unsigned a = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(a));
}
__device__ __forceinline__ void ldmatrix_x4_trans(std::uint32_t (&r)[4], const void* smem) {
  const unsigned a = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(a));
}

// Shared-memory tiles are [rows][D] with each row's 16-byte pieces XOR-
// swizzled by the row's low 3 bits, so the 8 rows an ldmatrix reads at one
// column hit 8 different bank groups.
template <int D>
__device__ __forceinline__ int swizzle(int row, int col) {
  return row * D + (((col >> 3) ^ (row & 7)) << 3) + (col & 7);
}

// Rows [first, first + rows) of one head's [tokens, D] slice into a tile;
// tokens at or past `valid` are zero-filled (so masked keys meet zeros, never
// stale bits that could be NaN).
template <typename T, int D>
__device__ __forceinline__ void load_tile(T* tile, const T* head, std::int64_t token_stride, int first, int rows,
                                          int valid) {
  constexpr int kPieces = D / 8;
  for (int i = threadIdx.x; i < rows * kPieces; i += kThreads) {
    const int r = i / kPieces, c = (i % kPieces) * 8;
    const int token = first + r;
    const bool ok = token < valid;
    const T* src = ok ? head + token * token_stride + c : head;
    cp_async16(tile + swizzle<D>(r, c), src, ok);
  }
}

__device__ __forceinline__ int key_end(const KernelParams& p, int row) {
  if (p.causal) return row + 1;
  return row < p.prefix_length ? p.prefix_length : p.tokens;
}

__device__ __forceinline__ float quad_sum(float x) {
  x += __shfl_xor_sync(0xffffffffu, x, 1);
  return x + __shfl_xor_sync(0xffffffffu, x, 2);
}
__device__ __forceinline__ float quad_max(float x) {
  x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 1));
  return fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 2));
}

// One thread's share of its warp's rows; row r of the thread is m16 tile
// r / 2, row g + 8 (r % 2) of it (thread_row).
template <typename T, int D, bool kMass>
struct WarpState {
  static constexpr int kKeyTiles = kChunkKeys / 8;  // n8 tiles of S
  static constexpr int kDimTiles = D / 8;           // n8 tiles of O
  float o[kWarpTiles][kDimTiles][4];
  float m[kThreadRows], m_ref[kThreadRows], l[kThreadRows];
  // Tile mass: this thread's part of the current key tile's sum, and the
  // tile (-1: none, past the prefix block).
  float tile_sum[kThreadRows];
  int tile;
};

// Row r of the thread whose row 0 is `first` (recomputed, not stored: registers are tight).
__device__ __forceinline__ int thread_row(int first, int r) { return first + (r / 2) * 16 + (r % 2) * 8; }

template <typename T, int D, bool kMass>
__device__ __forceinline__ void flush_tile(WarpState<T, D, kMass>& st, const KernelParams& p, int head, int first) {
  if (st.tile < 0) return;
  const int t = threadIdx.x & 3;
#pragma unroll
  for (int r = 0; r < kThreadRows; ++r) {
    const float sum = quad_sum(st.tile_sum[r]);
    const int row = thread_row(first, r);
    if (t == 0 && row < p.mass_prefix)
      p.mass_log[(static_cast<std::int64_t>(head) * p.mass_tiles + st.tile) * p.mass_prefix + row] =
          st.m_ref[r] + __log2f(sum);
    st.tile_sum[r] = 0.0f;
  }
}

// Q fragment (m16 x k16) of m16 tile mt at dims [16 kd, 16 kd + 16), read
// from shared memory each chunk: registers would not hold both tiles' Q.
template <int D, typename T>
__device__ __forceinline__ void q_fragment(std::uint32_t (&a)[4], const T* qs, int mt, int kd) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  ldmatrix_x4(a, qs + swizzle<D>(warp * kWarpRows + mt * 16 + (lane & 15), kd * 16 + (lane >> 4) * 8));
}

// Scores of one 64-key chunk for one warp: s = Q K^T from the chunk's K tile,
// masked, turned into probabilities; rescales l, o and the tile sum.
template <typename T, int D, bool kMass>
__device__ __forceinline__ void warp_scores(WarpState<T, D, kMass>& st,
                                            float (&s)[kWarpTiles][kChunkKeys / 8][4], const KernelParams& p,
                                            const T* qs, const T* ks, int chunk_begin, bool mask,
                                            int first, int head) {
  constexpr int NT = kChunkKeys / 8;
  const int lane = threadIdx.x & 31;
#pragma unroll
  for (int mt = 0; mt < kWarpTiles; ++mt)
#pragma unroll
    for (int n = 0; n < NT; ++n) s[mt][n][0] = s[mt][n][1] = s[mt][n][2] = s[mt][n][3] = 0.0f;
#pragma unroll
  for (int kd = 0; kd < D / 16; ++kd) {
    std::uint32_t a[kWarpTiles][4];
#pragma unroll
    for (int mt = 0; mt < kWarpTiles; ++mt) q_fragment<D>(a[mt], qs, mt, kd);
#pragma unroll
    for (int np = 0; np < NT / 2; ++np) {
      std::uint32_t b[4];
      const int key = np * 16 + (lane >> 4) * 8 + (lane & 7);
      const int col = kd * 16 + ((lane >> 3) & 1) * 8;
      ldmatrix_x4(b, ks + swizzle<D>(key, col));
#pragma unroll
      for (int mt = 0; mt < kWarpTiles; ++mt) {
        Mma<T>::run(s[mt][2 * np], a[mt], b[0], b[1]);
        Mma<T>::run(s[mt][2 * np + 1], a[mt], b[2], b[3]);
      }
    }
  }

  const int t = lane & 3;
  float alpha[kThreadRows], ref[kThreadRows];
#pragma unroll
  for (int r = 0; r < kThreadRows; ++r) {
    const int mt = r / 2, i = r % 2;
    // Raw scores until the exponent: the scale (positive) rides in its FMA.
    float mx = -INFINITY;
    const int end = key_end(p, thread_row(first, r));
#pragma unroll
    for (int n = 0; n < NT; ++n)
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        float& x = s[mt][n][2 * i + e];
        if (mask && chunk_begin + n * 8 + 2 * t + e >= end) x = -INFINITY;
        mx = fmaxf(mx, x);
      }
    mx = fmaxf(st.m[r], quad_max(mx) * p.scale_log2);
    ref[r] = mx == -INFINITY ? 0.0f : mx;
    alpha[r] = fast_exp2(st.m[r] - ref[r]);  // 0 while the row had seen no key (m = -inf)
    st.m[r] = mx;
  }
  if constexpr (kMass) {
    // A finished tile's sums are relative to the reference before this chunk.
    const int tile = chunk_begin < p.mass_prefix ? chunk_begin / p.mass_block : -1;
    if (tile != st.tile) {
      flush_tile(st, p, head, first);
      st.tile = tile;
    }
  }
#pragma unroll
  for (int r = 0; r < kThreadRows; ++r) {
    const int mt = r / 2, i = r % 2;
    st.m_ref[r] = ref[r];
    float chunk_sum = 0.0f;
#pragma unroll
    for (int n = 0; n < NT; ++n)
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        float& x = s[mt][n][2 * i + e];
        x = fast_exp2(fmaf(x, p.scale_log2, -ref[r]));
        chunk_sum += x;
      }
    st.l[r] = st.l[r] * alpha[r] + chunk_sum;
    if constexpr (kMass) {
      if (st.tile >= 0) st.tile_sum[r] = st.tile_sum[r] * alpha[r] + chunk_sum;
    }
#pragma unroll
    for (int dn = 0; dn < WarpState<T, D, kMass>::kDimTiles; ++dn) {
      st.o[mt][dn][2 * i] *= alpha[r];
      st.o[mt][dn][2 * i + 1] *= alpha[r];
    }
  }
}

// O += P V for one warp from the chunk's V tile.
template <typename T, int D, bool kMass>
__device__ __forceinline__ void warp_values(WarpState<T, D, kMass>& st,
                                            const float (&s)[kWarpTiles][kChunkKeys / 8][4], const T* vs) {
  constexpr int NT = kChunkKeys / 8;
  const int lane = threadIdx.x & 31;
#pragma unroll
  for (int kk = 0; kk < NT / 2; ++kk) {
    std::uint32_t a[kWarpTiles][4];
#pragma unroll
    for (int mt = 0; mt < kWarpTiles; ++mt) {
      a[mt][0] = Mma<T>::pack(s[mt][2 * kk][0], s[mt][2 * kk][1]);
      a[mt][1] = Mma<T>::pack(s[mt][2 * kk][2], s[mt][2 * kk][3]);
      a[mt][2] = Mma<T>::pack(s[mt][2 * kk + 1][0], s[mt][2 * kk + 1][1]);
      a[mt][3] = Mma<T>::pack(s[mt][2 * kk + 1][2], s[mt][2 * kk + 1][3]);
    }
#pragma unroll
    for (int dp = 0; dp < D / 16; ++dp) {
      std::uint32_t b[4];
      const int key = kk * 16 + ((lane >> 3) & 1) * 8 + (lane & 7);
      const int col = dp * 16 + (lane >> 4) * 8;
      ldmatrix_x4_trans(b, vs + swizzle<D>(key, col));
#pragma unroll
      for (int mt = 0; mt < kWarpTiles; ++mt) {
        Mma<T>::run(st.o[mt][2 * dp], a[mt], b[0], b[1]);
        Mma<T>::run(st.o[mt][2 * dp + 1], a[mt], b[2], b[3]);
      }
    }
  }
}

}  // namespace attention_echo::kernels::cuda::detail
