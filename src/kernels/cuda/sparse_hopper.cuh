// The sparse hit on Hopper (sm_90a): the kept-tile walk over a plan with
// both matrix products on wgmma, the warpgroup-wide asynchronous tensor-core
// instruction that reads its B operand straight from shared memory, in place
// of mma.sync fed by ldmatrix (flash_attention.cuh's kernel, which the miss
// paths keep: 250-265 TFLOP/s on an H200 for this walk).
//
// A thread block is a plan block, 128 query rows, and three warpgroups
// (FlashAttention-3's warp specialisation): a producer, whose one thread has
// the copy engine (TMA) bring the plan's 64-key chunks of K and V, two to a
// stage, into a ring of kHopperStages shared-memory stages
// (hopper_pipeline.cuh's barriers hand them over), and two consumers of 64
// rows each, each at its own pace: warp w of a consumer owns rows
// 16w .. 16w + 15, a thread rows g and g + 8 (g = lane / 4), mma.sync's
// fragment layout, so the online softmax is the mma.sync kernel's. Q stays
// in registers as wgmma A fragments.
//
// Shared-memory tiles are [D / 64][rows][64]: 128-byte rows, 16-byte pieces
// XOR-swizzled by the row's low 3 bits, the layout the copy engine's and
// wgmma's 128-byte swizzle modes share (tiles start 1024-byte aligned). K is
// read K-major (along D); V, stored the same way, is read transposed
// (MN-major).
#pragma once

#include "kernels/cuda/flash_attention.cuh"
#include "kernels/cuda/hopper_pipeline.cuh"

namespace attention_echo::kernels::cuda::detail {

inline constexpr int kHopperGroups = 2;  // consumer warpgroups a block
inline constexpr int kHopperRows = 64 * kHopperGroups;
inline constexpr int kHopperThreads = 128 * (kHopperGroups + 1);
// A stage holds two plan chunks (any two: each is its own copy), so each
// matrix product spans 128 keys and the per-stage costs (barriers, the
// row max's shuffles, O's rescale) are paid once per 128 keys.
inline constexpr int kStageChunks = 2;
inline constexpr int kStageKeys = kStageChunks * kChunkKeys;
inline constexpr int kHopperStages = 3;
// setmaxnreg's split of the 64K registers: the producer needs few, a
// consumer holds O (D / 2), a stage's scores (64) and probabilities (32)
// and Q's fragments (D / 4).
inline constexpr int kProducerRegisters = 40, kConsumerRegisters = 232;
static_assert(128 * (kProducerRegisters + kHopperGroups * kConsumerRegisters) <= 65536, "the register file");
static_assert(kHopperRows == kBlockRows && kWarpRows == 32, "a block is a plan block; a warpgroup two plan warps");

// The tensor maps of q (boxes of kHopperRows rows), k and v (kChunkKeys rows): tensor_map.cuh.
struct SparseMaps {
  CUtensorMap q, k, v;
};

template <int D>
struct HopperLayout {
  static constexpr int kQBytes = kHopperRows * D * 2;
  static constexpr int kTileBytes = kStageKeys * D * 2;  // a stage's K or V
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

// Tile mass (kMass: the dense walk's miss with mass): the log2 partial
// L = ref + log2(sum of p over the chunk's keys) of each kept chunk below
// p.mass_tiles, per row, at mass_log[(head * mass_tiles + chunk) *
// mass_prefix + row] (flash_attention.cuh's format with 64-key tiles). ref
// is the row's running max after this stage, the one the chunk's p are
// relative to, so L is exact when written: no later rescale. sum[i][c] is
// this thread's part of row g + 8i's sum over chunk c; the quad's four
// lanes reduce the four (row, chunk) sums in three shuffles, each lane
// ending with one whole sum to store (lane t: row t & 1, chunk t >> 1).
// One lane storing all four after four quad sums cost +31-44% over the walk
// where this (with the reduction skipping tiles above the diagonal) costs
// +15-20% (H200, BENCHMARKS.md section 6).
__device__ __forceinline__ void record_stage_mass(const KernelParams& p, int head, int first, const float (&ref)[2],
                                                  const float (&sum)[2][kStageChunks],
                                                  const int (&chunk_begin)[kStageChunks],
                                                  const bool (&kept)[kStageChunks]) {
  static_assert(kStageChunks == 2, "four (row, chunk) sums over a quad's four lanes");
  const int t = threadIdx.x & 3, i = t & 1, c = t >> 1;
  // Lanes t and t ^ 1 hold parts (other keys) of the same four sums: keep row i's.
  const float mine0 = i ? sum[1][0] : sum[0][0], theirs0 = i ? sum[0][0] : sum[1][0];
  const float mine1 = i ? sum[1][1] : sum[0][1], theirs1 = i ? sum[0][1] : sum[1][1];
  const float row0 = mine0 + __shfl_xor_sync(0xffffffffu, theirs0, 1);
  const float row1 = mine1 + __shfl_xor_sync(0xffffffffu, theirs1, 1);
  // Lanes t and t ^ 2: keep chunk c.
  const float total = (c ? row1 : row0) + __shfl_xor_sync(0xffffffffu, c ? row0 : row1, 2);
  const int chunk = (c ? chunk_begin[1] : chunk_begin[0]) / kChunkKeys, row = first + 8 * i;
  if ((c ? kept[1] : kept[0]) && chunk < p.mass_tiles && row < p.row_end)
    p.mass_log[(static_cast<std::int64_t>(head) * p.mass_tiles + chunk) * p.mass_prefix + row] =
        (i ? ref[1] : ref[0]) + __log2f(total);
}

// One warpgroup's online-softmax step over one stage's scores s (m64n128
// accumulators: s[4n + 2i + e] is row g + 8i, key 8n + 2t + e, of plan
// chunk n / 8 of the stage): masks keys at or past each row's end (in the
// chunks `mask` names) and every key of a chunk the row's plan warp does
// not keep, rescales l, leaves probabilities in s and the factor o is to be
// rescaled by in alpha, and with kMass records the tile mass.
template <bool kMass>
__device__ __forceinline__ void hopper_softmax(float (&s)[kStageKeys / 2], float (&alpha)[2], float (&m)[2],
                                              float (&l)[2], const KernelParams& p, int head,
                                              const int (&chunk_begin)[kStageChunks],
                                              const bool (&mask)[kStageChunks], int first,
                                              const bool (&kept)[kStageChunks]) {
  const int t = threadIdx.x & 3;
  float ref[2], sum[2][kStageChunks] = {};
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    const int row_end = key_end(p, first + 8 * i);
    float mx = -INFINITY;
#pragma unroll
    for (int n = 0; n < kStageKeys / 8; ++n) {
      const int c = n / 8, end = kept[c] ? row_end : 0;
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        float& x = s[4 * n + 2 * i + e];
        if (mask[c] && chunk_begin[c] + (n % 8) * 8 + 2 * t + e >= end) x = -INFINITY;
        mx = fmaxf(mx, x);
      }
    }
    mx = fmaxf(m[i], quad_max(mx) * p.scale_log2);
    ref[i] = mx == -INFINITY ? 0.0f : mx;
    alpha[i] = fast_exp2(m[i] - ref[i]);  // 0 while the row had seen no key (m = -inf)
    m[i] = mx;
#pragma unroll
    for (int n = 0; n < kStageKeys / 8; ++n)
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        float& x = s[4 * n + 2 * i + e];
        x = fast_exp2(fmaf(x, p.scale_log2, -ref[i]));
        sum[i][n / 8] += x;
      }
    l[i] = l[i] * alpha[i] + (sum[i][0] + sum[i][1]);
  }
  if constexpr (kMass) record_stage_mass(p, head, first, ref, sum, chunk_begin, kept);
}

template <int D>
__device__ __forceinline__ void rescale(float (&o)[D / 2], const float (&alpha)[2]) {
#pragma unroll
  for (int dn = 0; dn < D / 8; ++dn)
#pragma unroll
    for (int j = 0; j < 4; ++j) o[4 * dn + j] *= alpha[j / 2];
}

// P as bf16/fp16 A fragments of P V (the layout mma.sync's A has): a k16
// slice of the stage's keys each.
template <typename T>
__device__ __forceinline__ void pack_probabilities(std::uint32_t (&a)[kStageKeys / 16][4],
                                                   const float (&s)[kStageKeys / 2]) {
#pragma unroll
  for (int kk = 0; kk < kStageKeys / 16; ++kk)
#pragma unroll
    for (int j = 0; j < 4; ++j) a[kk][j] = Mma<T>::pack(s[8 * kk + 2 * j], s[8 * kk + 2 * j + 1]);
}

// O += P V for one stage, issued, V transposed from shared memory.
template <typename T, int D>
__device__ __forceinline__ void hopper_values(float (&o)[D / 2], const std::uint32_t (&a)[kStageKeys / 16][4],
                                              unsigned vs) {
  wgmma_fence();
#pragma unroll
  for (int kk = 0; kk < kStageKeys / 16; ++kk) {
    const std::uint64_t b = smem_desc(vs + kk * 16 * 128, kStageKeys * 128);
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

// S = Q K^T for one stage, issued, not waited for (raw scores: the scale
// rides in the exponent).
template <typename T, int D>
__device__ __forceinline__ void hopper_scores(float (&s)[kStageKeys / 2], const std::uint32_t (&q)[D / 16][4],
                                              unsigned ks) {
  static_assert(kStageKeys == 128, "m64n128 scores");
  wgmma_fence();
#pragma unroll
  for (int kd = 0; kd < D / 16; ++kd)
    Wgmma<T>::template rs_n128<0>(s, q[kd], smem_desc(ks + (kd / 4) * kStageKeys * 128 + (kd % 4) * 32, 16), kd > 0);
}

// The block's shared memory: Q, then kHopperStages stages of K and V, from a
// 1024-byte aligned address; each stage's full and empty barriers and plan
// entries (read by the consumers' softmax), and Q's barrier. A stage's
// index is its n-th use over the walk.
template <int D>
struct HopperRing {
  using L = HopperLayout<D>;
  unsigned qs, bars;
  std::uint32_t* entries;  // [kHopperStages][kStageChunks]
  __device__ unsigned ks(int stage) const { return qs + L::kQBytes + (stage % kHopperStages) * L::kStageBytes; }
  __device__ unsigned vs(int stage) const { return ks(stage) + L::kTileBytes; }
  __device__ unsigned full(int stage) const { return bars + 8 * (stage % kHopperStages); }
  __device__ unsigned empty(int stage) const { return bars + 8 * (kHopperStages + stage % kHopperStages); }
  __device__ unsigned q_full() const { return bars + 16 * kHopperStages; }
  __device__ std::uint32_t* stage_entries(int stage) const { return entries + (stage % kHopperStages) * kStageChunks; }
  // The k-th use of a stage completes its barriers' phase k.
  __device__ static unsigned parity(int stage) { return (stage / kHopperStages) & 1; }
};

__host__ __device__ constexpr int stages_of(int chunks) { return (chunks + kStageChunks - 1) / kStageChunks; }

// The producer warp: Q, then the plan's chunks into the ring, a stage's
// worth at a time, each stage once the consumers have released its previous
// use. A last stage the plan does not fill repeats its first chunk with no
// row keeping it (finite values, never stale bits). Its lanes read the plan
// 32 entries at a time (one load's latency per 32 chunks, not per chunk);
// lane 0 issues.
template <int D>
__device__ __forceinline__ void produce(const HopperRing<D>& ring, const SparseMaps& maps, const std::uint32_t* plan,
                                        int count, int head, int kv, int q_row0) {
  constexpr unsigned kQBytes = HopperLayout<D>::kQBytes, kTileBytes = HopperLayout<D>::kTileBytes;
  static_assert(32 % kStageChunks == 0, "a batch of entries holds whole stages");
  const int lane = threadIdx.x & 31;
  if (lane == 0) {
    mbarrier_expect_bytes(ring.q_full(), kQBytes);
    for (int half = 0; half < D / 64; ++half)
      tma_load_3d(ring.qs + half * kHopperRows * 128, maps.q, 64 * half, q_row0, head, ring.q_full());
  }
  std::uint32_t batch = 0;
  for (int stage = 0; stage < stages_of(count); ++stage) {
    const int c0 = stage * kStageChunks;
    if (c0 % 32 == 0) batch = c0 + lane < count ? plan[c0 + lane] : 0;
    std::uint32_t e[kStageChunks];
#pragma unroll
    for (int j = 0; j < kStageChunks; ++j) e[j] = __shfl_sync(0xffffffffu, batch, (c0 + j) % 32);
    if (lane != 0) continue;
#pragma unroll
    for (int j = 1; j < kStageChunks; ++j)
      if (c0 + j >= count) e[j] = e[0] & 0xffffu;
    if (stage >= kHopperStages) mbarrier_wait(ring.empty(stage), ring.parity(stage) ^ 1);
    // The entries before the arrival: its release makes them visible with the stage.
    for (int j = 0; j < kStageChunks; ++j) ring.stage_entries(stage)[j] = e[j];
    mbarrier_expect_bytes(ring.full(stage), 2 * kTileBytes);
    for (int j = 0; j < kStageChunks; ++j) {
      const int first = static_cast<int>(e[j] & 0xffffu) * kChunkKeys;
      for (int half = 0; half < D / 64; ++half) {
        const unsigned at = half * kStageKeys * 128 + j * kChunkKeys * 128;
        tma_load_3d(ring.ks(stage) + at, maps.k, 64 * half, first, kv, ring.full(stage));
        tma_load_3d(ring.vs(stage) + at, maps.v, 64 * half, first, kv, ring.full(stage));
      }
    }
  }
}

// A consumer warpgroup's walk over the block's count chunks for its 64 rows
// (group 0 or 1), a stage at a time, in FlashAttention-3's order: iteration
// it issues S(it) and P V of stage it - 1, waits for S(it) alone and
// computes its softmax while P V runs, then waits for P V (stage it - 1 is
// then free). The two consumers do not take turns at the tensor cores
// (FlashAttention-3's ping-pong through named barriers): that measured a tie
// here (docs/cuda/NOTES.md). A consumer computes every chunk the block
// walks, masking the rows whose plan warp does not keep it: a wgmma under a
// branch ptxas cannot prove uniform is serialised, which costs more than the
// chunks one warpgroup alone keeps (the block's last causal chunk, for the
// first).
template <typename T, int D, bool kMass>
__device__ __forceinline__ void consume(const HopperRing<D>& ring, const KernelParams& p, int head, int count,
                                        int group, int row0, float (&o)[D / 2], float (&l)[2], float (&m)[2]) {
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int group_row0 = row0 + 64 * group;
  const std::uint32_t row_bit = 1u << (16 + 2 * group + (warp % 4) / 2);
  const int group_min_end = key_end(p, group_row0);
  const int first = group_row0 + (warp % 4) * 16 + (lane >> 2);
  float s[kStageKeys / 2], alpha[2];
  m[0] = m[1] = -INFINITY;
#pragma unroll
  for (int i = 0; i < D / 2; ++i) o[i] = 0.0f;
  l[0] = l[1] = 0.0f;
  mbarrier_wait(ring.q_full(), 0);  // Q's copy lands before the block can leave
  const int stages = stages_of(count);
  if (stages == 0) return;
  std::uint32_t q[D / 16][4], a[kStageKeys / 16][4];
  load_q_fragments<D>(q, ring.qs, group);
  auto softmax = [&](int stage) {
    int begin[kStageChunks];
    bool mask[kStageChunks], kept[kStageChunks];
#pragma unroll
    for (int j = 0; j < kStageChunks; ++j) {
      const std::uint32_t e = ring.stage_entries(stage)[j];
      begin[j] = static_cast<int>(e & 0xffffu) * kChunkKeys;
      kept[j] = (e & row_bit) != 0;
      mask[j] = begin[j] + kChunkKeys > group_min_end || !kept[j];
    }
    hopper_softmax<kMass>(s, alpha, m, l, p, head, begin, mask, first, kept);
  };
  mbarrier_wait(ring.full(0), 0);
  hopper_scores<T, D>(s, q, ring.ks(0));
  wgmma_commit();
  wgmma_wait<0>();
  fence_registers(s);
  softmax(0);
  pack_probabilities<T>(a, s);
  for (int it = 1; it < stages; ++it) {
    mbarrier_wait(ring.full(it), ring.parity(it));
    hopper_scores<T, D>(s, q, ring.ks(it));
    wgmma_commit();
    hopper_values<T, D>(o, a, ring.vs(it - 1));
    wgmma_commit();
    wgmma_wait<1>();  // S(it)
    fence_registers(s);
    softmax(it);
    wgmma_wait<0>();  // P V of stage it - 1
    fence_registers(o);
    if (lane == 0) mbarrier_arrive(ring.empty(it - 1));
    // Only now: P V(it - 1) reads o and the P registers until the wait
    // above. Packing P earlier made ptxas serialise every wgmma (C7513).
    rescale<D>(o, alpha);
    pack_probabilities<T>(a, s);
  }
  hopper_values<T, D>(o, a, ring.vs(stages - 1));
  wgmma_commit();
  wgmma_wait<0>();
  fence_registers(o);
}

// The walk's outputs: o / l for this thread's rows g and g + 8 (rows that saw
// no key get zeros; rows before query_offset, which q does not hold, none),
// and where p.row_lse is set each row's log-sum-exp of its scaled scores
// (natural log; m is the quad's running max in log2 units).
template <typename T, int D>
__device__ __forceinline__ void store_rows(const KernelParams& p, int head, int first, const float (&o)[D / 2],
                                           const float (&l)[2], const float (&m)[2]) {
  T* oh = static_cast<T*>(p.out) + head * p.out_head_stride;
  const int t = threadIdx.x & 3;
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    const int row = first + 8 * i;
    const float sum = quad_sum(l[i]);
    const float inv = sum > 0.0f ? 1.0f / sum : 0.0f;
    if (row >= p.row_end || row < p.query_offset) continue;
    if (p.row_lse != nullptr && t == 0)
      p.row_lse[static_cast<std::int64_t>(head) * p.mass_prefix + row] =
          sum > 0.0f ? (m[i] + __log2f(sum)) * 0.69314718055994530942f : -INFINITY;
    T* out = oh + (row - p.query_offset) * p.out_token_stride + 2 * t;
#pragma unroll
    for (int dn = 0; dn < D / 8; ++dn)
      *reinterpret_cast<std::uint32_t*>(out + dn * 8) = Mma<T>::pack(o[4 * dn + 2 * i] * inv, o[4 * dn + 2 * i + 1] * inv);
  }
}

// The sparse walk over a plan (flash_attention.cuh's entry format: a chunk
// and a bit per 32-row plan warp; consumer g holds plan warps 2g, 2g + 1).
// Rows [query_offset, row_end): the grid starts at query_offset's block, q
// and out hold rows from query_offset on (a block that straddles it loads
// its earlier q rows as zeros and stores none of them), so a row gets the
// same bits whichever query_offset it is computed under. Warpgroup 0
// produces (its other warps leave at once, their registers handed to the
// consumers); warpgroups 1 and 2 consume: no block-wide barrier per chunk,
// so one consumer's softmax runs beside the other's matrix products.
template <typename T, int D, bool kMass>
__global__ void __launch_bounds__(kHopperThreads, 1)
    sparse_hopper_kernel(const KernelParams p, const __grid_constant__ SparseMaps maps) {
  extern __shared__ unsigned char smem[];
  __shared__ alignas(8) std::uint64_t barriers[2 * kHopperStages + 1];
  __shared__ std::uint32_t entries[kHopperStages * kStageChunks];
  const HopperRing<D> ring{(static_cast<unsigned>(__cvta_generic_to_shared(smem)) + 1023u) & ~1023u,
                           static_cast<unsigned>(__cvta_generic_to_shared(barriers)), entries};
  const int head = blockIdx.y, kv = head / p.group;
  // Causal blocks further down the sequence have more keys: start them first.
  const int block = p.query_offset / kHopperRows + (p.causal ? gridDim.x - 1 - blockIdx.x : blockIdx.x);
  const int row0 = block * kHopperRows;
  const std::uint32_t at0 = p.plan_offsets[head * p.plan_head_stride + block];
  const std::uint32_t* plan = p.plan_entries + at0;
  // The entries below the block's last key: a prefix, chunks ascend.
  int count = static_cast<int>(p.plan_offsets[head * p.plan_head_stride + block + 1] - at0);
  const int block_end = key_end(p, min(row0 + kHopperRows, p.row_end) - 1);
  while (count > 0 && static_cast<int>(plan[count - 1] & 0xffffu) * kChunkKeys >= block_end) --count;

  if (threadIdx.x == 0) {
    for (int s = 0; s < kHopperStages; ++s) {
      mbarrier_init(ring.full(s), 1);
      mbarrier_init(ring.empty(s), 4 * kHopperGroups);  // each consumer warp's
    }
    mbarrier_init(ring.q_full(), 1);
    mbarrier_init_fence();
  }
  __syncthreads();
  const int warp = threadIdx.x >> 5;
  if (warp < 4) {
    release_registers<kProducerRegisters>();
    if (warp == 0) produce<D>(ring, maps, plan, count, head, kv, row0 - p.query_offset);
    return;
  }
  claim_registers<kConsumerRegisters>();
  const int group = warp / 4 - 1;
  float o[D / 2], l[2], m[2];
  consume<T, D, kMass>(ring, p, head, count, group, row0, o, l, m);
  store_rows<T, D>(p, head, row0 + 64 * group + (warp % 4) * 16 + ((threadIdx.x & 31) >> 2), o, l, m);
}

}  // namespace attention_echo::kernels::cuda::detail
