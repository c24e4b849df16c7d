// tile_mass_capture.hpp: Q K^T of the sampled rows on mma.sync (the
// attention kernel's fragments and shared-memory layout,
// flash_attention.cuh), exponentiated against each row's log-sum-exp and
// summed per key tile. No V, no online softmax: the LSE is known.
//
// Work item: 16 consecutive entries of a head's sampled-row list (row list
// index L = I * samples + k is row I * block + k * block / samples), one m16
// tile. A block's warps take kWarpItems items each, all of one kv head, the
// heads of a GQA group side by side, so each 64-key chunk of K is loaded
// once into shared memory for all of them.
#include "kernels/cuda/tile_mass_capture.hpp"

#include <cuda_runtime.h>

#include <climits>

#include <stdexcept>
#include <string>

#include "core/errors.hpp"
#include "kernels/cuda/flash_attention.cuh"

namespace attention_echo::kernels::cuda {
namespace {

using namespace detail;

constexpr int kItemRows = 16;
// Items per warp: they share every K fragment the warp reads from shared
// memory (2 against 1: 3.34 against 3.65 ms for 16/128 rows at T = 32k on
// an H200; 4: 3.87 ms, fewer blocks resident).
constexpr int kWarpItems = 2;
constexpr int kItemsPerBlock = kWarpItems * kThreads / 32;
// Keys per block (a multiple of the tile, at least this): a block walking
// every key of its rows serially left the GPU waiting on the longest
// (causal, last) blocks: 0.14 ms at T = 4k for 16/128 rows, 0.125 ms for
// 8/128, the same for half the work.
constexpr int kSplitKeys = 1024;
// Prefixes of at most kShortTiles tiles have few rows to sample and short
// walks: half the keys a block, twice the blocks, fill the GPU better. 8 of
// 128 rows on an H200, 1024 -> 512 keys: the capture alone 80 -> 65 us at
// T = 4k, 156 -> 141 us at 8k; at 16k and 32k 512 was slower (418 -> 437 us,
// 1.49 -> 1.64 ms); with block 64 at 4k (64 tiles) the routed miss took 1%
// longer, within its spread.
constexpr int kShortTiles = 64;
constexpr int kShortSplitKeys = 512;

struct CaptureParams {
  const void* q;
  const void* k;
  std::int64_t q_head_stride, q_token_stride, k_head_stride, k_token_stride;
  const float* lse;  // [heads, lse_head_stride]
  std::int64_t lse_head_stride;
  float* mass;
  int group, prefix, block, tiles, samples, causal;
  int items;       // per head: ceil(tiles * samples / 16)
  int split_keys;  // keys per block (blockIdx.z a split), a multiple of block
  float scale_log2;
};

void check_cuda(cudaError_t status, const char* what) {
  if (status != cudaSuccess) throw std::runtime_error(std::string(what) + ": " + cudaGetErrorString(status));
}

__host__ __device__ int ceil_div(int a, int b) { return (a + b - 1) / b; }

// Keys a block walks for a prefix of `tiles` tiles of `block`.
int split_keys(int tiles, int block) {
  return ceil_div(tiles <= kShortTiles ? kShortSplitKeys : kSplitKeys, block) * block;
}

// The position of sampled-list entry L (past the prefix where its tile is).
__device__ __forceinline__ int sampled_row(const CaptureParams& p, int list) {
  return list / p.samples * p.block + list % p.samples * (p.block / p.samples);
}

// Sampled rows of tile I inside the prefix: the mean's divisor.
__device__ __forceinline__ int tile_rows(const CaptureParams& p, int tile) {
  return min(p.samples, ceil_div(p.prefix - tile * p.block, p.block / p.samples));
}

// Block item b of a block whose first is `first`: (m, g) with the group's head g fastest.
struct Item {
  int head, m;
  bool valid;
};
__device__ __forceinline__ Item item_of(const CaptureParams& p, int kv, int index) {
  return {kv * p.group + index % p.group, index / p.group, index / p.group < p.items};
}

// One thread's rows (g and g + 8 of each of its warp's items): their tile,
// key end (0: no row), log2-unit LSE and running sum of the current key tile.
struct ThreadRows {
  int head[kWarpItems], tile[kWarpItems][2], end[kWarpItems][2];
  float lse2[kWarpItems][2], acc[kWarpItems][2];
};

template <typename T, int D>
__global__ void __launch_bounds__(kThreads) capture_kernel(CaptureParams p) {
  extern __shared__ __align__(128) unsigned char smem[];
  T* qs = reinterpret_cast<T*>(smem);  // kItemsPerBlock x 16 rows
  auto ks = [&](int stage) { return qs + (kItemsPerBlock * kItemRows + stage * kChunkKeys) * D; };
  const int kv = blockIdx.y;
  // Causal items further down the sequence see more keys: start them first.
  const int first_item = (p.causal ? gridDim.x - 1 - blockIdx.x : blockIdx.x) * kItemsPerBlock;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const T* kh = static_cast<const T*>(p.k) + kv * p.k_head_stride;

  // The block's keys: its split of those up to its last item's last tile
  // (causal), of the prefix otherwise.
  int last = first_item + kItemsPerBlock - 1;
  while (last > first_item && !item_of(p, kv, last).valid) --last;
  const int last_tile = min(p.tiles - 1, (item_of(p, kv, last).m * kItemRows + kItemRows - 1) / p.samples);
  const int key_begin = blockIdx.z * p.split_keys;
  const int key_end = min(key_begin + p.split_keys, p.causal ? min(p.prefix, (last_tile + 1) * p.block) : p.prefix);
  if (key_begin >= key_end) return;  // past the block's rows' keys: the whole block leaves
  constexpr int kPieces = D / 8;
  for (int i = threadIdx.x; i < kItemsPerBlock * kItemRows * kPieces; i += kThreads) {
    const int slot = i / kPieces, c = (i % kPieces) * 8;
    const Item item = item_of(p, kv, first_item + slot / kItemRows);
    const int list = item.m * kItemRows + slot % kItemRows;
    const int row = sampled_row(p, list);
    const bool ok = item.valid && list / p.samples < p.tiles && row < p.prefix;
    const T* src = static_cast<const T*>(p.q) + item.head * p.q_head_stride + (ok ? row * p.q_token_stride + c : 0);
    cp_async16(qs + swizzle<D>(slot, c), src, ok);
  }
  const int count = ceil_div(key_end - key_begin, kChunkKeys);
  if (count > 0) load_tile<T, D>(ks(0), kh, p.k_token_stride, key_begin, kChunkKeys, p.prefix);
  cp_async_commit();
  if (count > 1) load_tile<T, D>(ks(1), kh, p.k_token_stride, key_begin + kChunkKeys, kChunkKeys, p.prefix);
  cp_async_commit();

  const int g = lane >> 2, t = lane & 3;
  ThreadRows tr;
  int warp_end = 0, warp_min_end = INT_MAX;  // over the warp's rows that are rows
#pragma unroll
  for (int i = 0; i < kWarpItems; ++i) {
    const Item item = item_of(p, kv, first_item + warp * kWarpItems + i);
    tr.head[i] = item.head;
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int list = item.m * kItemRows + g + 8 * r;
      const int row = sampled_row(p, list);
      tr.tile[i][r] = list / p.samples;
      const bool ok = item.valid && tr.tile[i][r] < p.tiles && row < p.prefix;
      tr.end[i][r] = !ok ? 0 : (p.causal ? row + 1 : p.prefix);
      // A row that is none gets LSE +inf: 2^(s - inf) = 0 on every key, masked or not.
      tr.lse2[i][r] = ok ? p.lse[item.head * p.lse_head_stride + row] * 1.44269504088896340736f : INFINITY;
      tr.acc[i][r] = 0.0f;
      warp_end = max(warp_end, tr.end[i][r]);
      if (ok) warp_min_end = min(warp_min_end, tr.end[i][r]);
    }
  }
  for (int o = 16; o > 0; o >>= 1) {
    warp_end = max(warp_end, __shfl_xor_sync(0xffffffffu, warp_end, o));
    warp_min_end = min(warp_min_end, __shfl_xor_sync(0xffffffffu, warp_min_end, o));
  }

  int current = -1;  // the key tile acc sums
  // Lanes whose row r lies in one query tile: row g + 8 r sits in lane
  // 4 g + t, so samples 4 puts rows 0-3 and 4-7 in tiles of their own (lanes
  // 0-15, 16-31); samples 8 or a multiple of 16, the whole warp.
  const int tile_lanes = 4 * min(p.samples, 8);
  auto flush = [&] {
#pragma unroll
    for (int i = 0; i < kWarpItems; ++i)
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        float sum = tr.acc[i][r];
        for (int o = tile_lanes / 2; o > 0; o >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, o);
        if (lane % tile_lanes == 0 && current >= 0 && tr.tile[i][r] < p.tiles && sum > 0.0f)
          atomicAdd(p.mass + (static_cast<std::int64_t>(tr.head[i]) * p.tiles + tr.tile[i][r]) * p.tiles + current,
                    sum / tile_rows(p, tr.tile[i][r]));
        tr.acc[i][r] = 0.0f;
      }
  };

  for (int it = 0; it < count; ++it) {
    const int chunk_begin = key_begin + it * kChunkKeys;
    cp_async_wait_one();
    __syncthreads();
    if (chunk_begin < warp_end) {
      const T* k_tile = ks(it & 1);
      float s[kWarpItems][kChunkKeys / 8][4];
#pragma unroll
      for (int i = 0; i < kWarpItems; ++i)
#pragma unroll
        for (int n = 0; n < kChunkKeys / 8; ++n) s[i][n][0] = s[i][n][1] = s[i][n][2] = s[i][n][3] = 0.0f;
#pragma unroll
      for (int kd = 0; kd < D / 16; ++kd) {
        std::uint32_t a[kWarpItems][4];
#pragma unroll
        for (int i = 0; i < kWarpItems; ++i)
          ldmatrix_x4(a[i], qs + swizzle<D>((warp * kWarpItems + i) * kItemRows + (lane & 15), kd * 16 + (lane >> 4) * 8));
#pragma unroll
        for (int np = 0; np < kChunkKeys / 16; ++np) {
          std::uint32_t b[4];
          ldmatrix_x4(b, k_tile + swizzle<D>(np * 16 + (lane >> 4) * 8 + (lane & 7), kd * 16 + ((lane >> 3) & 1) * 8));
#pragma unroll
          for (int i = 0; i < kWarpItems; ++i) {
            Mma<T>::run(s[i][2 * np], a[i], b[0], b[1]);
            Mma<T>::run(s[i][2 * np + 1], a[i], b[2], b[3]);
          }
        }
      }
      const int chunk_tile = chunk_begin / p.block;
      if (chunk_tile != current) {
        flush();
        current = chunk_tile;
      }
      // Only chunks that reach past some row's last key need the mask.
      const bool mask = chunk_begin + kChunkKeys > warp_min_end;
#pragma unroll
      for (int i = 0; i < kWarpItems; ++i)
#pragma unroll
        for (int r = 0; r < 2; ++r)
#pragma unroll
          for (int n = 0; n < kChunkKeys / 8; ++n)
#pragma unroll
            for (int e = 0; e < 2; ++e)
              if (!mask || chunk_begin + n * 8 + 2 * t + e < tr.end[i][r])
                tr.acc[i][r] += fast_exp2(fmaf(s[i][n][2 * r + e], p.scale_log2, -tr.lse2[i][r]));
    }
    __syncthreads();  // every warp is done with this stage
    if (it + 2 < count)
      load_tile<T, D>(ks(it & 1), kh, p.k_token_stride, chunk_begin + 2 * kChunkKeys, kChunkKeys, p.prefix);
    cp_async_commit();
  }
  cp_async_wait_all();
  flush();
}

template <typename T, int D>
void launch(const CaptureParams& params, int kv_heads, cudaStream_t stream) {
  constexpr int kSmem = (kItemsPerBlock * kItemRows + 2 * kChunkKeys) * D * static_cast<int>(sizeof(T));
  static const bool configured = [] {
    check_cuda(cudaFuncSetAttribute(capture_kernel<T, D>, cudaFuncAttributeMaxDynamicSharedMemorySize, kSmem),
               "cudaFuncSetAttribute");
    return true;
  }();
  (void)configured;
  const int blocks = ceil_div(params.items * params.group, kItemsPerBlock);
  const int splits = ceil_div(params.prefix, params.split_keys);
  capture_kernel<T, D><<<dim3(blocks, kv_heads, splits), kThreads, kSmem, stream>>>(params);
  check_cuda(cudaGetLastError(), "tile mass capture kernel launch");
}

}  // namespace

void check_tile_mass_args(const DeviceProblem& problem, int prefix, int block, int samples) {
  check_problem(problem);
  if (problem.query_offset != 0) throw_invalid("problem", "query_offset must be 0 to record tile mass");
  if (prefix < 0 || prefix > problem.k.tokens) throw_invalid("prefix", "must be in [0, T]");
  if (!problem.causal && problem.prefix_length != prefix)
    throw_invalid("prefix", "must equal the problem's prefix_length for non-causal tile mass");
  if (block <= 0 || block % kChunkKeys != 0)
    throw_invalid("block", "must be a positive multiple of " + std::to_string(kChunkKeys) + " on CUDA");
  if (samples <= 0 || block % samples != 0 || (samples != 4 && samples != 8 && samples % kItemRows != 0))
    throw_invalid("samples", "must be 4, 8 or a multiple of 16 that divides block");
}

DeviceTileMass capture_tile_mass(const DeviceProblem& problem, const float* row_lse, int prefix, int block,
                                 int samples, void* stream) {
  check_tile_mass_args(problem, prefix, block, samples);
  if (row_lse == nullptr) throw_invalid("row_lse", "must not be null");
  const int heads = problem.q.heads, tiles = ceil_div(prefix, block);
  DeviceTileMass result{block, tiles, heads,
                        DeviceBuffer(static_cast<std::size_t>(heads) * tiles * tiles * sizeof(float), stream)};
  if (tiles == 0) return result;
  const auto s = static_cast<cudaStream_t>(stream);
  check_cuda(cudaMemsetAsync(result.mass.data(), 0, result.mass.bytes(), s), "cudaMemsetAsync");
  constexpr float kLog2e = 1.44269504088896340736f;
  const CaptureParams params{problem.q.data,
                             problem.k.data,
                             problem.q.head_stride,
                             problem.q.token_stride,
                             problem.k.head_stride,
                             problem.k.token_stride,
                             row_lse,
                             problem.k.tokens,
                             static_cast<float*>(result.mass.data()),
                             problem.q.heads / problem.k.heads,
                             prefix,
                             block,
                             tiles,
                             samples,
                             problem.causal ? 1 : 0,
                             ceil_div(tiles * samples, kItemRows),
                             split_keys(tiles, block),
                             problem.scale * kLog2e};
  const bool bf16 = problem.q.dtype == DType::kBF16;
  if (problem.q.dim == 128)
    bf16 ? launch<__nv_bfloat16, 128>(params, problem.k.heads, s) : launch<__half, 128>(params, problem.k.heads, s);
  else
    bf16 ? launch<__nv_bfloat16, 64>(params, problem.k.heads, s) : launch<__half, 64>(params, problem.k.heads, s);
  return result;
}

}  // namespace attention_echo::kernels::cuda
