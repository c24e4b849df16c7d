// The sparse hit on Hopper (sm_90a): the kept-tile walk over a plan with
// both matrix products on wgmma, the warpgroup-wide asynchronous tensor-core
// instruction that reads its B operand straight from shared memory, in place
// of mma.sync fed by ldmatrix (flash_attention.cuh's kernel, which the miss
// paths keep: 250-265 TFLOP/s on an H200 for this walk, against 300-330 here).
//
// A thread block is a plan block, 128 query rows, as two warpgroups of 64
// rows: warp w of a warpgroup owns rows 16w .. 16w + 15, a thread rows g and
// g + 8 (g = lane / 4), mma.sync's fragment layout, so the online softmax is
// the mma.sync kernel's. Q stays in registers as wgmma A fragments; the
// plan's 64-key chunks of K and V stream through kHopperStages shared-memory
// stages by cp.async.
//
// Shared-memory tiles are [D / 64][rows][64]: 128-byte rows, 16-byte pieces
// XOR-swizzled by the row's low 3 bits, the layout wgmma's 128-byte swizzle
// mode reads (tiles start 1024-byte aligned). K is read K-major (along D);
// V, stored the same way, is read transposed (MN-major).
#pragma once

#include "kernels/cuda/flash_attention.cuh"

namespace attention_echo::kernels::cuda::detail {

inline constexpr int kHopperGroups = 2;  // warpgroups a block
inline constexpr int kHopperRows = 64 * kHopperGroups;
inline constexpr int kHopperThreads = 128 * kHopperGroups;
inline constexpr int kHopperStages = 5;
static_assert(kHopperRows == kBlockRows && kWarpRows == 32, "a block is a plan block; a warpgroup two plan warps");

template <int D>
struct HopperLayout {
  static constexpr int kQBytes = kHopperRows * D * 2;
  static constexpr int kTileBytes = kChunkKeys * D * 2;  // a K or V chunk
  static constexpr int kStageBytes = 2 * kTileBytes;
  static constexpr int kBytes = kQBytes + kHopperStages * kStageBytes + 1024;  // + room to align to 1024
};

// m64nNk16 with fp32 accumulators, A from registers, B from shared memory
// (K-major, or MN-major with kTransB); accumulate 0 overwrites d.
template <typename T>
struct Wgmma;

// The specializations differ only in the PTX type of A and B.
#define AE_WGMMA(TYPE, PTX) \
template <> \
struct Wgmma<TYPE> { \
  template <int kTransB> \
  __device__ static void rs_n64(float (&d)[32], const std::uint32_t (&a)[4], std::uint64_t b, int accumulate) { \
    asm volatile( \
        "{\n.reg .pred p;\nsetp.ne.b32 p, %37, 0;\n" \
        "wgmma.mma_async.sync.aligned.m64n64k16.f32." PTX "." PTX " {%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15,%16,%17,%18,%19,%20,%21,%22,%23,%24,%25,%26,%27,%28,%29,%30,%31}, {%32,%33,%34,%35}, %36, p, 1, 1, %38;\n}\n" \
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]) \
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b), "r"(accumulate), "n"(kTransB)); \
  } \
  template <int kTransB> \
  __device__ static void rs_n128(float (&d)[64], const std::uint32_t (&a)[4], std::uint64_t b, int accumulate) { \
    asm volatile( \
        "{\n.reg .pred p;\nsetp.ne.b32 p, %69, 0;\n" \
        "wgmma.mma_async.sync.aligned.m64n128k16.f32." PTX "." PTX " {%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15,%16,%17,%18,%19,%20,%21,%22,%23,%24,%25,%26,%27,%28,%29,%30,%31,%32,%33,%34,%35,%36,%37,%38,%39,%40,%41,%42,%43,%44,%45,%46,%47,%48,%49,%50,%51,%52,%53,%54,%55,%56,%57,%58,%59,%60,%61,%62,%63}, {%64,%65,%66,%67}, %68, p, 1, 1, %70;\n}\n" \
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63]) \
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b), "r"(accumulate), "n"(kTransB)); \
  } \
};

AE_WGMMA(__nv_bfloat16, "bf16")
AE_WGMMA(__half, "f16")
#undef AE_WGMMA

__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
template <int N>
__device__ __forceinline__ void wgmma_wait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
}
// Reads of accumulators stay after the wait that completes them.
template <int N>
__device__ __forceinline__ void fence_registers(float (&r)[N]) {
#pragma unroll
  for (int i = 0; i < N; ++i) asm volatile("" : "+f"(r[i])::"memory");
}
// cp.async writes are generic-proxy writes; wgmma reads through the async proxy.
__device__ __forceinline__ void fence_async_shared() { asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory"); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

// A shared-memory matrix descriptor, 128-byte swizzle; 8-row groups 1024
// bytes apart; lbo: the distance between 64-wide column halves where the
// operand spans two (V read transposed), else unused.
__device__ __forceinline__ std::uint64_t smem_desc(unsigned addr, unsigned lbo) {
  return static_cast<std::uint64_t>((addr & 0x3ffffu) >> 4) | static_cast<std::uint64_t>(lbo >> 4) << 16 |
         static_cast<std::uint64_t>(1024 >> 4) << 32 | 1ull << 62;
}

// Byte offset of (r, c) in a [D / 64][rows][64] tile.
__device__ __forceinline__ unsigned swizzle128(int rows, int r, int c) {
  return (c >> 6) * rows * 128 + r * 128 + ((((c >> 3) & 7) ^ (r & 7)) << 4) + (c & 7) * 2;
}

// Rows [first, first + rows) of a head's [tokens, D] slice into the tile at
// shared address `tile`; tokens at or past `valid` zero-filled.
template <typename T, int D>
__device__ __forceinline__ void load_tile128(unsigned tile, const T* head, std::int64_t token_stride, int first,
                                             int rows, int valid) {
  constexpr int kPieces = D / 8;
  for (int i = threadIdx.x; i < rows * kPieces; i += kHopperThreads) {
    const int r = i / kPieces, c = (i % kPieces) * 8;
    const int token = first + r;
    const bool ok = token < valid;
    const T* src = ok ? head + token * token_stride + c : head;
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(tile + swizzle128(rows, r, c)), "l"(src),
                 "r"(ok ? 16 : 0));
  }
}

// One warpgroup's online-softmax step over one chunk's scores s (m64n64
// accumulators: s[4n + 2i + e] is row g + 8i, key 8n + 2t + e): masks keys
// at or past each row's end, rescales l, leaves probabilities in s and the
// factor o is to be rescaled by in alpha.
__device__ __forceinline__ void hopper_softmax(float (&s)[32], float (&alpha)[2], float (&m)[2], float (&l)[2],
                                              const KernelParams& p, int chunk_begin, bool mask, int first,
                                              bool kept) {
  const int t = threadIdx.x & 3;
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    // A row of a plan warp that does not keep the chunk sees none of it.
    const int end = kept ? key_end(p, first + 8 * i) : 0;
    float mx = -INFINITY;
#pragma unroll
    for (int n = 0; n < 8; ++n)
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        float& x = s[4 * n + 2 * i + e];
        if (mask && chunk_begin + n * 8 + 2 * t + e >= end) x = -INFINITY;
        mx = fmaxf(mx, x);
      }
    mx = fmaxf(m[i], quad_max(mx) * p.scale_log2);
    const float ref = mx == -INFINITY ? 0.0f : mx;
    alpha[i] = fast_exp2(m[i] - ref);  // 0 while the row had seen no key (m = -inf)
    m[i] = mx;
    float sum = 0.0f;
#pragma unroll
    for (int n = 0; n < 8; ++n)
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        float& x = s[4 * n + 2 * i + e];
        x = fast_exp2(fmaf(x, p.scale_log2, -ref));
        sum += x;
      }
    l[i] = l[i] * alpha[i] + sum;
  }
}

template <int D>
__device__ __forceinline__ void rescale(float (&o)[D / 2], const float (&alpha)[2]) {
#pragma unroll
  for (int dn = 0; dn < D / 8; ++dn)
#pragma unroll
    for (int j = 0; j < 4; ++j) o[4 * dn + j] *= alpha[j / 2];
}

// O += P V for one chunk, issued: P from s as bf16/fp16 A fragments (the
// layout mma.sync's A has), V transposed from shared memory.
template <typename T, int D>
__device__ __forceinline__ void hopper_values(float (&o)[D / 2], const float (&s)[32], unsigned vs) {
  std::uint32_t a[4][4];
#pragma unroll
  for (int kk = 0; kk < 4; ++kk)
#pragma unroll
    for (int j = 0; j < 4; ++j) a[kk][j] = Mma<T>::pack(s[8 * kk + 2 * j], s[8 * kk + 2 * j + 1]);
  wgmma_fence();
#pragma unroll
  for (int kk = 0; kk < 4; ++kk) {
    const std::uint64_t b = smem_desc(vs + kk * 16 * 128, kChunkKeys * 128);
    if constexpr (D == 128) Wgmma<T>::template rs_n128<1>(o, a[kk], b, 1);
    else Wgmma<T>::template rs_n64<1>(o, a[kk], b, 1);
  }
}

// This warpgroup's Q rows as A fragments, one per 16 columns, held for the
// whole walk, so each chunk's scores read only K from shared memory (Q read
// from shared memory by every chunk measured 1.5% slower at T = 32k, within
// the run-to-run spread).
template <int D>
__device__ __forceinline__ void load_q_fragments(std::uint32_t (&q)[D / 16][4], unsigned qs, int group) {
  const int lane = threadIdx.x & 31, row = 64 * group + 16 * ((threadIdx.x >> 5) % 4) + (lane & 15);
#pragma unroll
  for (int kd = 0; kd < D / 16; ++kd) {
    const unsigned at = qs + swizzle128(kHopperRows, row, kd * 16 + (lane >> 4) * 8);
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(q[kd][0]), "=r"(q[kd][1]), "=r"(q[kd][2]), "=r"(q[kd][3])
                 : "r"(at));
  }
}

// S = Q K^T for one chunk, issued, not waited for (raw scores: the scale
// rides in the exponent).
template <typename T, int D>
__device__ __forceinline__ void hopper_scores(float (&s)[32], const std::uint32_t (&q)[D / 16][4], unsigned ks) {
  wgmma_fence();
#pragma unroll
  for (int kd = 0; kd < D / 16; ++kd)
    Wgmma<T>::template rs_n64<0>(s, q[kd], smem_desc(ks + (kd / 4) * kChunkKeys * 128 + (kd % 4) * 32, 16), kd > 0);
}

// The sparse walk over a plan (flash_attention.cuh's entry format: a chunk
// and a bit per 32-row plan warp; warpgroup g holds plan warps 2g, 2g + 1).
// query_offset is 0. Each warpgroup overlaps its softmax with its matrix
// products: iteration it issues S(it + 1), computes the softmax of chunk it
// while S(it + 1) and P V of chunk it - 1 run, waits for both, then issues
// P V of chunk it and leaves it running into the next iteration. Chunk
// it + S - 2 loads meanwhile (S stages: it - 1 .. it + 1 are in use).
template <typename T, int D>
__global__ void __launch_bounds__(kHopperThreads, 1) sparse_hopper_kernel(KernelParams p) {
  using L = HopperLayout<D>;
  constexpr int S = kHopperStages;
  extern __shared__ unsigned char smem[];
  const unsigned qs = (static_cast<unsigned>(__cvta_generic_to_shared(smem)) + 1023u) & ~1023u;
  auto ks = [&](int chunk) { return qs + L::kQBytes + (chunk % S) * L::kStageBytes; };
  auto vs = [&](int chunk) { return ks(chunk) + L::kTileBytes; };
  const int head = blockIdx.y, kv = head / p.group;
  // Causal blocks further down the sequence have more keys: start them first.
  const int block = p.causal ? gridDim.x - 1 - blockIdx.x : blockIdx.x;
  const int row0 = block * kHopperRows;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, group = warp / 4;
  const T* kh = static_cast<const T*>(p.k) + kv * p.k_head_stride;
  const T* vh = static_cast<const T*>(p.v) + kv * p.v_head_stride;
  const std::uint32_t at0 = p.plan_offsets[head * p.plan_blocks + block];
  const std::uint32_t* plan = p.plan_entries + at0;
  // The entries below the block's last key: a prefix, chunks ascend.
  int count = static_cast<int>(p.plan_offsets[head * p.plan_blocks + block + 1] - at0);
  const int block_end = key_end(p, min(row0 + kHopperRows, p.row_end) - 1);
  while (count > 0 && static_cast<int>(plan[count - 1] & 0xffffu) * kChunkKeys >= block_end) --count;

  // Each entry is read from global memory a chunk ahead of its load (its
  // latency behind a whole chunk's work, not in front of the load) and kept
  // beside its stage for the chunk's softmax.
  __shared__ std::uint32_t stage_entry[S];
  std::uint32_t upcoming = count > 0 ? plan[0] : 0;
  int loaded = 0;
  auto load_next = [&](int chunk) {
    if (loaded < count) {
      const std::uint32_t e = upcoming;
      if (loaded + 1 < count) upcoming = plan[loaded + 1];
      const int first = static_cast<int>(e & 0xffffu) * kChunkKeys;
      load_tile128<T, D>(ks(chunk), kh, p.k_token_stride, first, kChunkKeys, p.tokens);
      load_tile128<T, D>(vs(chunk), vh, p.v_token_stride, first, kChunkKeys, p.tokens);
      if (threadIdx.x == 0) stage_entry[chunk % S] = e;
      ++loaded;
    }
    cp_async_commit();  // possibly empty: one group per chunk keeps the wait counts uniform
  };
  load_tile128<T, D>(qs, static_cast<const T*>(p.q) + head * p.q_head_stride, p.q_token_stride, row0, kHopperRows,
                     p.row_end);
#pragma unroll
  for (int chunk = 0; chunk < S - 2; ++chunk) load_next(chunk);

  // This warpgroup's rows. It computes every chunk the block loads, masking
  // the rows whose plan warp does not keep it: a wgmma under a branch ptxas
  // cannot prove uniform is serialised, which costs more than the chunks one
  // warpgroup alone keeps (the block's last causal chunk, for the first).
  const int group_row0 = row0 + 64 * group;
  const std::uint32_t row_bit = 1u << (16 + 2 * group + (warp % 4) / 2);
  const int group_min_end = key_end(p, group_row0);

  float o[D / 2], m[2] = {-INFINITY, -INFINITY}, l[2] = {0.0f, 0.0f}, s[32], s_next[32];
#pragma unroll
  for (int i = 0; i < D / 2; ++i) o[i] = 0.0f;
  const int first = group_row0 + (warp % 4) * 16 + (lane >> 2);
  cp_async_wait<S - 3>();  // chunk 0 (and Q)
  fence_async_shared();
  __syncthreads();
  std::uint32_t q[D / 16][4];
  load_q_fragments<D>(q, qs, group);
  hopper_scores<T, D>(s, q, ks(0));
  wgmma_commit();
  wgmma_wait<0>();
  fence_registers(s);
  // One chunk; cur holds its scores, next receives the next chunk's (two
  // buffers swapped by unrolling, not copied).
  int it = 0;
  auto step = [&](float (&cur)[32], float (&nxt)[32]) {
    cp_async_wait<S - 4>();  // chunk it + 1
    fence_async_shared();
    // Every piece of chunk it + 1 landed; chunk it - 2's stage is free (its
    // P V was waited for in iteration it - 1).
    __syncthreads();
    load_next(it + S - 2);
    // Past the last chunk this reads a stale stage, unused: a wgmma under a
    // branch would be serialised.
    hopper_scores<T, D>(nxt, q, ks(it + 1));
    wgmma_commit();
    const std::uint32_t e = stage_entry[it % S];
    const int chunk_begin = static_cast<int>(e & 0xffffu) * kChunkKeys;
    const bool kept = (e & row_bit) != 0;
    float alpha[2];
    hopper_softmax(cur, alpha, m, l, p, chunk_begin, chunk_begin + kChunkKeys > group_min_end || !kept, first, kept);
    // P V of chunk it - 1 and the scores of chunk it + 1. (Waiting for the
    // first alone, wait_group 1, made ptxas serialise every wgmma.)
    wgmma_wait<0>();
    fence_registers(o);
    fence_registers(nxt);
    rescale<D>(o, alpha);
    hopper_values<T, D>(o, cur, vs(it));
    wgmma_commit();  // runs on into the next chunk's softmax
    ++it;
  };
  while (it < count) {
    step(s, s_next);
    if (it < count) step(s_next, s);
  }
  wgmma_wait<0>();
  fence_registers(o);
  cp_async_wait<0>();

  T* oh = static_cast<T*>(p.out) + head * p.out_head_stride;
  const int t = lane & 3;
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    const int row = first + 8 * i;
    const float sum = quad_sum(l[i]);
    const float inv = sum > 0.0f ? 1.0f / sum : 0.0f;  // a row that saw no key gets zeros
    if (row >= p.row_end) continue;
    T* out = oh + row * p.out_token_stride + 2 * t;
#pragma unroll
    for (int dn = 0; dn < D / 8; ++dn)
      *reinterpret_cast<std::uint32_t*>(out + dn * 8) = Mma<T>::pack(o[4 * dn + 2 * i] * inv, o[4 * dn + 2 * i + 1] * inv);
  }
}

}  // namespace attention_echo::kernels::cuda::detail
