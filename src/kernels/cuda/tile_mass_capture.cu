// tile_mass_capture.hpp: Q K^T of the sampled rows on mma.sync (the
// attention kernel's fragments and shared-memory layout,
// flash_attention.cuh), exponentiated against each row's log-sum-exp and
// summed per key tile. No V, no online softmax: the LSE is known.
//
// Work item: 16 consecutive entries of a head's sampled-row list (row list
// index L = I * samples + k is row I * block + k * block / samples), one m16
// tile of one warp. A block's 4 warps take 4 items of one kv head, the heads
// of a GQA group side by side, so each 64-key chunk of K is loaded once into
// shared memory for all of them.
#include "kernels/cuda/tile_mass_capture.hpp"

#include <cuda_runtime.h>

#include <stdexcept>
#include <string>

#include "core/errors.hpp"
#include "kernels/cuda/flash_attention.cuh"

namespace attention_echo::kernels::cuda {
namespace {

using namespace detail;

constexpr int kItemRows = 16;
constexpr int kItemsPerBlock = kThreads / 32;

struct CaptureParams {
  const void* q;
  const void* k;
  std::int64_t q_head_stride, q_token_stride, k_head_stride, k_token_stride;
  const float* lse;  // [heads, lse_head_stride]
  std::int64_t lse_head_stride;
  float* mass;
  int group, prefix, block, tiles, samples, causal;
  int items;  // per head: ceil(tiles * samples / 16)
  float scale_log2;
};

void check_cuda(cudaError_t status, const char* what) {
  if (status != cudaSuccess) throw std::runtime_error(std::string(what) + ": " + cudaGetErrorString(status));
}

__host__ __device__ int ceil_div(int a, int b) { return (a + b - 1) / b; }

// The position of sampled-list entry L (past the prefix where its tile is).
__device__ __forceinline__ int sampled_row(const CaptureParams& p, int list) {
  return list / p.samples * p.block + list % p.samples * (p.block / p.samples);
}

// Sampled rows of tile I inside the prefix: the mean's divisor.
__device__ __forceinline__ int tile_rows(const CaptureParams& p, int tile) {
  return min(p.samples, ceil_div(p.prefix - tile * p.block, p.block / p.samples));
}

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

  // Items are (m, g) with the group's head g fastest.
  auto item_head = [&](int w) { return kv * p.group + (first_item + w) % p.group; };
  auto item_m = [&](int w) { return (first_item + w) / p.group; };
  auto item_valid = [&](int w) { return item_m(w) < p.items; };

  constexpr int kPieces = D / 8;
  for (int i = threadIdx.x; i < kItemsPerBlock * kItemRows * kPieces; i += kThreads) {
    const int slot = i / kPieces, c = (i % kPieces) * 8, w = slot / kItemRows;
    const int list = item_m(w) * kItemRows + slot % kItemRows;
    const int row = sampled_row(p, list);
    const bool ok = item_valid(w) && list / p.samples < p.tiles && row < p.prefix;
    const T* src = static_cast<const T*>(p.q) + item_head(w) * p.q_head_stride + (ok ? row * p.q_token_stride + c : 0);
    cp_async16(qs + swizzle<D>(slot, c), src, ok);
  }
  // The block's keys: up to its last item's last tile (causal), the prefix otherwise.
  int last = kItemsPerBlock - 1;
  while (last > 0 && !item_valid(last)) --last;
  const int last_tile = min(p.tiles - 1, (item_m(last) * kItemRows + kItemRows - 1) / p.samples);
  const int key_end = p.causal ? min(p.prefix, (last_tile + 1) * p.block) : p.prefix;
  const int count = ceil_div(key_end, kChunkKeys);
  if (count > 0) load_tile<T, D>(ks(0), kh, p.k_token_stride, 0, kChunkKeys, p.prefix);
  cp_async_commit();
  if (count > 1) load_tile<T, D>(ks(1), kh, p.k_token_stride, kChunkKeys, kChunkKeys, p.prefix);
  cp_async_commit();

  // This thread's rows g and g + 8 of its warp's item.
  const int head = item_head(warp), g = lane >> 2, t = lane & 3;
  int tile[2], row[2], end[2];
  float lse2[2], acc[2] = {0.0f, 0.0f};
  int warp_end = 0;
  for (int r = 0; r < 2; ++r) {
    const int list = item_m(warp) * kItemRows + g + 8 * r;
    tile[r] = list / p.samples;
    row[r] = sampled_row(p, list);
    const bool ok = item_valid(warp) && tile[r] < p.tiles && row[r] < p.prefix;
    end[r] = !ok ? 0 : (p.causal ? row[r] + 1 : p.prefix);
    lse2[r] = ok ? p.lse[head * p.lse_head_stride + row[r]] * 1.44269504088896340736f : 0.0f;
    warp_end = max(warp_end, end[r]);
  }
  for (int o = 16; o > 0; o >>= 1) warp_end = max(warp_end, __shfl_xor_sync(0xffffffffu, warp_end, o));

  int current = -1;  // the key tile acc sums
  auto flush = [&] {
    for (int r = 0; r < 2; ++r) {
      float sum = acc[r];
      for (int o = 16; o > 0; o >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, o);
      // Every lane's row r lies in one tile (16-row items, samples 8 or a multiple of 16).
      if (lane == 0 && current >= 0 && tile[r] < p.tiles && sum > 0.0f)
        atomicAdd(p.mass + (static_cast<std::int64_t>(head) * p.tiles + tile[r]) * p.tiles + current,
                  sum / tile_rows(p, tile[r]));
      acc[r] = 0.0f;
    }
  };

  float s[kChunkKeys / 8][4];
  for (int it = 0; it < count; ++it) {
    const int chunk_begin = it * kChunkKeys;
    cp_async_wait_one();
    __syncthreads();
    if (chunk_begin < warp_end) {
      const T* k_tile = ks(it & 1);
#pragma unroll
      for (int n = 0; n < kChunkKeys / 8; ++n) s[n][0] = s[n][1] = s[n][2] = s[n][3] = 0.0f;
#pragma unroll
      for (int kd = 0; kd < D / 16; ++kd) {
        std::uint32_t a[4];
        ldmatrix_x4(a, qs + swizzle<D>(warp * kItemRows + (lane & 15), kd * 16 + (lane >> 4) * 8));
#pragma unroll
        for (int np = 0; np < kChunkKeys / 16; ++np) {
          std::uint32_t b[4];
          ldmatrix_x4(b, k_tile + swizzle<D>(np * 16 + (lane >> 4) * 8 + (lane & 7), kd * 16 + ((lane >> 3) & 1) * 8));
          Mma<T>::run(s[2 * np], a, b[0], b[1]);
          Mma<T>::run(s[2 * np + 1], a, b[2], b[3]);
        }
      }
      const int chunk_tile = chunk_begin / p.block;
      if (chunk_tile != current) {
        flush();
        current = chunk_tile;
      }
#pragma unroll
      for (int r = 0; r < 2; ++r)
#pragma unroll
        for (int n = 0; n < kChunkKeys / 8; ++n)
#pragma unroll
          for (int e = 0; e < 2; ++e)
            if (chunk_begin + n * 8 + 2 * t + e < end[r])
              acc[r] += fast_exp2(fmaf(s[n][2 * r + e], p.scale_log2, -lse2[r]));
    }
    __syncthreads();  // every warp is done with this stage
    if (it + 2 < count) load_tile<T, D>(ks(it & 1), kh, p.k_token_stride, (it + 2) * kChunkKeys, kChunkKeys, p.prefix);
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
  capture_kernel<T, D><<<dim3(blocks, kv_heads), kThreads, kSmem, stream>>>(params);
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
  if (samples <= 0 || block % samples != 0 || (samples != 8 && samples % kItemRows != 0))
    throw_invalid("samples", "must be 8 or a multiple of 16 that divides block");
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
                             problem.scale * kLog2e};
  const bool bf16 = problem.q.dtype == DType::kBF16;
  if (problem.q.dim == 128)
    bf16 ? launch<__nv_bfloat16, 128>(params, problem.k.heads, s) : launch<__half, 128>(params, problem.k.heads, s);
  else
    bf16 ? launch<__nv_bfloat16, 64>(params, problem.k.heads, s) : launch<__half, 64>(params, problem.k.heads, s);
  return result;
}

}  // namespace attention_echo::kernels::cuda
