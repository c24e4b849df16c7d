// Host entry points of the CUDA kernels: argument checks, the attention
// kernel's block loop (flash_attention.cuh does the per-warp math), the tile
// mass reduction, the sparse plan (walked by sparse_hopper.cuh) and the row
// copy.
#include "kernels/cuda/cuda_attention.hpp"

#include <cuda_runtime.h>

#include <algorithm>
#include <bit>
#include <cmath>
#include <limits>
#include <map>
#include <mutex>
#include <stdexcept>
#include <string>
#include <vector>

#include "core/errors.hpp"
#include "kernels/cuda/flash_attention.cuh"
#include "kernels/cuda/sparse_hopper.cuh"
#include "kernels/cuda/tensor_map.cuh"

namespace attention_echo::kernels::cuda {
namespace {

using namespace detail;

static_assert(kBlockRows == kRowsPerBlock, "the header's block size is the kernel's");
static_assert(kWarps <= 8, "a plan entry has 8 warp bits");

void check_cuda(cudaError_t status, const char* what) {
  if (status != cudaSuccess) throw std::runtime_error(std::string(what) + ": " + cudaGetErrorString(status));
}

cudaStream_t as_stream(void* stream) { return static_cast<cudaStream_t>(stream); }

// The stream-ordered pool scratch comes from, one per device. It keeps what
// it reserved between calls (release threshold: everything), as PyTorch's
// caching allocator does: the default pool returns memory to the driver at
// every synchronisation, and every call (each synchronises once, for the
// fingerprint or the guard) then mapped its scratch afresh; a 32k exact hit
// went from 0.57 to 0.36 ms (H200, bench_echo.py). It holds the largest
// scratch a call needed: the tile mass's, H x tiles x prefix floats, 2.1 GB
// at 32k tokens. Its own pool, so the device's default pool keeps the
// process's settings.
cudaMemPool_t scratch_pool() {
  int device = 0;
  check_cuda(cudaGetDevice(&device), "cudaGetDevice");
  static std::mutex mutex;
  static std::map<int, cudaMemPool_t> pools;  // never destroyed: the process's lifetime
  const std::lock_guard lock(mutex);
  auto [it, added] = pools.try_emplace(device, nullptr);
  if (!added) return it->second;
  cudaMemPoolProps props{};
  props.allocType = cudaMemAllocationTypePinned;
  props.location = {cudaMemLocationTypeDevice, device};
  cudaMemPool_t pool = nullptr;
  check_cuda(cudaMemPoolCreate(&pool, &props), "cudaMemPoolCreate");
  std::uint64_t keep = std::numeric_limits<std::uint64_t>::max();
  check_cuda(cudaMemPoolSetAttribute(pool, cudaMemPoolAttrReleaseThreshold, &keep), "cudaMemPoolSetAttribute");
  return it->second = pool;
}

// A device buffer's contents on the host, once the stream gets there (waits for it).
template <typename T>
std::vector<T> download(const DeviceBuffer& buffer, void* stream) {
  std::vector<T> host(buffer.bytes() / sizeof(T));
  if (host.empty()) return host;
  check_cuda(cudaMemcpyAsync(host.data(), buffer.data(), buffer.bytes(), cudaMemcpyDeviceToHost, as_stream(stream)),
             "cudaMemcpyAsync");
  check_cuda(cudaStreamSynchronize(as_stream(stream)), "cudaStreamSynchronize");
  return host;
}

__host__ __device__ int ceil_div(int a, int b) { return (a + b - 1) / b; }

__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T, int D, bool kMass>
__global__ void __launch_bounds__(kThreads, kWarpTiles) attention_kernel(KernelParams p) {
  extern __shared__ __align__(128) unsigned char smem[];
  // Q, then two stages of (K, V): chunk it + 1 loads while chunk it computes.
  T* qs = reinterpret_cast<T*>(smem);
  auto ks = [&](int stage) { return qs + (kBlockRows + 2 * stage * kChunkKeys) * D; };
  auto vs = [&](int stage) { return qs + (kBlockRows + (2 * stage + 1) * kChunkKeys) * D; };
  const int head = blockIdx.y;
  const int kv = head / p.group;
  // Causal blocks further down the sequence have more keys: start them first.
  const int block = p.causal ? gridDim.x - 1 - blockIdx.x : blockIdx.x;
  const int row0 = p.query_offset + block * kBlockRows;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const T* qh = static_cast<const T*>(p.q) + head * p.q_head_stride;
  const T* kh = static_cast<const T*>(p.k) + kv * p.k_head_stride;
  const T* vh = static_cast<const T*>(p.v) + kv * p.v_head_stride;

  const int count = ceil_div(min(key_end(p, min(row0 + kBlockRows, p.row_end) - 1), p.tokens), kChunkKeys);
  auto load_chunk = [&](int it) {
    load_tile<T, D>(ks(it & 1), kh, p.k_token_stride, it * kChunkKeys, kChunkKeys, p.tokens);
    load_tile<T, D>(vs(it & 1), vh, p.v_token_stride, it * kChunkKeys, kChunkKeys, p.tokens);
  };
  load_tile<T, D>(qs, qh, p.q_token_stride, row0 - p.query_offset, kBlockRows, p.row_end - p.query_offset);
  if (count > 0) load_chunk(0);
  cp_async_commit();
  if (count > 1) load_chunk(1);
  cp_async_commit();

  WarpState<T, D, kMass> st;
#pragma unroll
  for (int mt = 0; mt < kWarpTiles; ++mt)
#pragma unroll
    for (int dn = 0; dn < D / 8; ++dn) st.o[mt][dn][0] = st.o[mt][dn][1] = st.o[mt][dn][2] = st.o[mt][dn][3] = 0.0f;
  const int wrow0 = row0 + warp * kWarpRows;
  const int first = wrow0 + (lane >> 2);
#pragma unroll
  for (int r = 0; r < kThreadRows; ++r) {
    st.m[r] = -INFINITY;
    st.m_ref[r] = 0.0f;
    st.l[r] = 0.0f;
    st.tile_sum[r] = 0.0f;
  }
  st.tile = -1;
  const bool warp_has_rows = wrow0 < p.row_end;
  // key_end grows with the row: the warp's first and last rows bound it.
  const int warp_min_end = key_end(p, wrow0);
  const int warp_max_end = key_end(p, min(wrow0 + kWarpRows, p.row_end) - 1);

  float s[kWarpTiles][kChunkKeys / 8][4];
  for (int it = 0; it < count; ++it) {
    const int chunk_begin = it * kChunkKeys;
    cp_async_wait_one();  // this chunk's group has landed; the next one's may still fly
    __syncthreads();
    if (warp_has_rows && chunk_begin < warp_max_end) {
      warp_scores(st, s, p, qs, ks(it & 1), chunk_begin, chunk_begin + kChunkKeys > warp_min_end, first, head);
      warp_values(st, s, vs(it & 1));
    }
    __syncthreads();  // every warp is done with this stage
    if (it + 2 < count) load_chunk(it + 2);
    cp_async_commit();  // possibly empty: one group per chunk keeps the wait count uniform
  }
  cp_async_wait_all();

  if constexpr (kMass) flush_tile(st, p, head, first);
  T* oh = static_cast<T*>(p.out) + head * p.out_head_stride;
  const int t = lane & 3;
#pragma unroll
  for (int r = 0; r < kThreadRows; ++r) {
    const int mt = r / 2, i = r % 2;
    const int row = thread_row(first, r);
    const float l = quad_sum(st.l[r]);
    const float inv = l > 0.0f ? 1.0f / l : 0.0f;  // a row that saw no key gets zeros
    if constexpr (kMass) {
      if (t == 0 && row < p.mass_prefix)
        p.row_lse[head * p.mass_prefix + row] = (st.m_ref[r] + __log2f(l)) * 0.69314718055994530942f;
    }
    if (row >= p.row_end) continue;
    T* out = oh + (row - p.query_offset) * p.out_token_stride + 2 * t;
#pragma unroll
    for (int dn = 0; dn < D / 8; ++dn)
      *reinterpret_cast<std::uint32_t*>(out + dn * 8) =
          Mma<T>::pack(st.o[mt][dn][2 * i] * inv, st.o[mt][dn][2 * i + 1] * inv);
  }
}

// mass[(h * tiles + I) * tiles + J]: the mean over query tile I's rows
// (those below prefix) of the sum over J's log2 partials L of 2^(L - lse),
// lse the row's log-sum-exp (row_lse holds it in natural log), over the
// tiles a row sees. The partials are per `parts` keys (block: one per tile, the mma.sync
// kernel's; 64: one per chunk, the dense walk's), entries of them per head,
// rows `stride` apart in mass_log and row_lse. One block per (I, h), a warp
// per J, lanes over rows.
__global__ void tile_mass_kernel(const float* mass_log, const float* row_lse, float* mass, int prefix, int stride,
                                 int block, int tiles, int parts, int entries, int causal) {
  const int tile = blockIdx.x, head = blockIdx.y;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int first = tile * block, last = min(first + block, prefix);
  for (int j = warp; j < tiles; j += kWarps) {
    float sum = 0.0f;
    if (causal && j > tile) {  // above the diagonal: no row sees it
      if (lane == 0) mass[(static_cast<std::int64_t>(head) * tiles + tile) * tiles + j] = 0.0f;
      continue;
    }
    for (int r = first + lane; r < last; r += 32) {
      const float lse = row_lse[static_cast<std::int64_t>(head) * stride + r] * 1.44269504088896340736f;
      for (int e = j * block / parts; e < min((j + 1) * block / parts, entries); ++e)
        if (!causal || e * parts <= r)
          sum += exp2f(mass_log[(static_cast<std::int64_t>(head) * entries + e) * stride + r] - lse);
    }
    for (int o = 16; o > 0; o >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, o);
    if (lane == 0) mass[(static_cast<std::int64_t>(head) * tiles + tile) * tiles + j] = sum / (last - first);
  }
}

// A sum over the block, the same bits every run (fixed reduction order);
// every thread gets it.
__device__ double block_sum(double x) {
  __shared__ double warp_sums[kWarps];
  for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
  __syncthreads();  // warp_sums of an earlier call are read
  if ((threadIdx.x & 31) == 0) warp_sums[threadIdx.x >> 5] = x;
  __syncthreads();
  double sum = 0.0;
  for (int w = 0; w < kWarps; ++w) sum += warp_sums[w];
  return sum;
}

// One block per row (h * tiles + I) of the tile mass: the kept set
// select_tiles defines (the sink, the diagonal, then the heaviest others,
// ties by lower index, until keep_mass of the row is covered; never a tile
// without mass), found without sorting. The float bits of non-negative
// masses order like the masses, so the threshold is bisected on them: the
// largest b whose others of mass >= b still cover what is needed. The others
// above b are kept, and of those exactly at b the lowest indices that
// complete it. Written as a bit per tile.
__global__ void select_tiles_kernel(const float* mass, int tiles, double keep_mass, std::uint32_t* kept, int words) {
  const int row = blockIdx.x, diagonal = row % tiles;
  const float* m = mass + static_cast<std::int64_t>(row) * tiles;
  std::uint32_t* bits = kept + static_cast<std::int64_t>(row) * words;
  auto bits_of = [&](int j) { return __float_as_uint(m[j]); };
  auto other = [&](int j) { return j != 0 && j != diagonal; };
  auto others_from = [&](std::uint32_t b) {  // the others' mass at or above bit pattern b
    double sum = 0.0;
    for (int j = threadIdx.x; j < tiles; j += blockDim.x)
      if (other(j) && bits_of(j) >= b) sum += m[j];
    return block_sum(sum);
  };
  double total = 0.0;
  for (int j = threadIdx.x; j < tiles; j += blockDim.x) total += m[j];
  const double need = keep_mass * block_sum(total) - m[0] - (diagonal != 0 ? m[diagonal] : 0.0);
  constexpr std::uint32_t kInf = 0x7f800000u;
  std::uint32_t keep_from = kInf, tie = 0;  // the sink and the diagonal alone; no ties
  if (need > 0.0 && others_from(1) < need) {
    keep_from = 1;  // rounding: every other tile with mass, and still short
  } else if (need > 0.0) {
    std::uint32_t lo = 1, hi = kInf;  // others_from(lo) >= need > others_from(hi)
    while (hi - lo > 1) {
      const std::uint32_t mid = lo + (hi - lo) / 2;
      (others_from(mid) >= need ? lo : hi) = mid;
    }
    keep_from = hi, tie = lo;
  }
  double covered = tie != 0 ? others_from(keep_from) : 0.0;
  for (int w = threadIdx.x; w < words; w += blockDim.x) bits[w] = 0;
  __syncthreads();
  for (int j = threadIdx.x; j < tiles; j += blockDim.x)
    if (!other(j) || bits_of(j) >= keep_from) atomicOr(bits + j / 32, 1u << (j % 32));
  if (threadIdx.x != 0 || tie == 0) return;
  for (int j = 1; j < tiles && covered < need; ++j)
    if (other(j) && bits_of(j) == tie) {
      atomicOr(bits + j / 32, 1u << (j % 32));
      covered += m[j];
    }
}

// Rows [0, rows) of one head (blockIdx.y) in 16-byte pieces. Each thread
// moves kCopyUnroll pieces, every load before the first store, so that
// enough bytes are in flight to keep HBM busy; the index math is 32-bit
// (rows * pieces per head), and where both views keep a head's rows back
// to back (kSpan: token stride = dim) a head is one span and needs none.
// One piece a thread with 64-bit index division copied an 8k prefix's 64 MB
// in 0.056 ms on an H200, 2.3 TB/s of its 4.8.
constexpr int kCopyThreads = 256, kCopyUnroll = 4;

template <bool kSpan>
__device__ std::int64_t piece_offset(int i, int pieces, std::int64_t token_stride) {
  if constexpr (kSpan) return i;
  return static_cast<std::int64_t>(i / pieces) * token_stride + i % pieces;
}

template <bool kSpan>
__global__ void __launch_bounds__(kCopyThreads)
    copy_rows_kernel(const uint4* __restrict__ src, std::int64_t src_head, std::int64_t src_token,
                     uint4* __restrict__ dst, std::int64_t dst_head, std::int64_t dst_token, int rows, int pieces) {
  const int n = rows * pieces;
  src += blockIdx.y * src_head;
  dst += blockIdx.y * dst_head;
  const int first = blockIdx.x * kCopyThreads * kCopyUnroll + static_cast<int>(threadIdx.x);
  uint4 piece[kCopyUnroll];
#pragma unroll
  for (int u = 0; u < kCopyUnroll; ++u) {
    const int i = first + u * kCopyThreads;
    if (i < n) piece[u] = src[piece_offset<kSpan>(i, pieces, src_token)];
  }
#pragma unroll
  for (int u = 0; u < kCopyUnroll; ++u) {
    const int i = first + u * kCopyThreads;
    if (i < n) dst[piece_offset<kSpan>(i, pieces, dst_token)] = piece[u];
  }
}

// --- argument checks ---

template <typename V>
void check_view(std::string_view name, const V& view) {
  if (view.data == nullptr) throw_invalid(name, "must not be null");
  if (view.heads <= 0 || view.tokens < 0 || view.dim <= 0) throw_invalid(name, "heads and dim must be positive");
  if (reinterpret_cast<std::uintptr_t>(view.data) % 16 != 0 || view.head_stride % 8 != 0 || view.token_stride % 8 != 0)
    throw_invalid(name, "data must be 16-byte aligned and strides multiples of 8 elements");
  // The tensor maps the sparse kernel loads through cannot step by 0 (a
  // broadcast view, e.g. torch's expand() of one kv head).
  if ((view.heads > 1 && view.head_stride == 0) || (view.tokens > 1 && view.token_stride == 0))
    throw_invalid(name, "strides must be positive (a broadcast view must be made contiguous)");
  cudaPointerAttributes attributes{};
  if (cudaPointerGetAttributes(&attributes, view.data) != cudaSuccess ||
      (attributes.type != cudaMemoryTypeDevice && attributes.type != cudaMemoryTypeManaged)) {
    cudaGetLastError();  // clear the sticky error of a host pointer
    throw_invalid(name, "must be in CUDA device memory");
  }
  int current = 0;
  check_cuda(cudaGetDevice(&current), "cudaGetDevice");
  if (attributes.device != current)
    throw_invalid(name, "is on cuda:" + std::to_string(attributes.device) + ", the call runs on cuda:" +
                            std::to_string(current));
}

}  // namespace

void check_problem(const DeviceProblem& p) {
  check_view("query", p.q);
  check_view("key", p.k);
  check_view("value", p.v);
  check_view("out", p.out);
  if (p.q.dtype != DType::kF16 && p.q.dtype != DType::kBF16)
    throw_invalid("query", "dtype must be float16 or bfloat16 on CUDA, got " + to_string(p.q.dtype));
  if (p.q.dim != 64 && p.q.dim != 128)
    throw_invalid("query", "dim must be 64 or 128 on CUDA, got " + std::to_string(p.q.dim));
  if (p.k.dtype != p.q.dtype || p.v.dtype != p.q.dtype || p.out.dtype != p.q.dtype)
    throw_invalid("key", "query, key, value and out must have one dtype");
  if (p.k.dim != p.q.dim || p.v.dim != p.q.dim || p.out.dim != p.q.dim)
    throw_invalid("key", "dim must match query's");
  if (p.q.heads % p.k.heads != 0) throw_invalid("key", "query heads must be a multiple of kv heads");
  if (p.v.heads != p.k.heads || p.v.tokens != p.k.tokens) throw_invalid("value", "shape must match key's");
  if (p.out.heads != p.q.heads || p.out.tokens != p.q.tokens) throw_invalid("out", "shape must match query's");
  if (p.query_offset < 0 || p.query_offset + p.q.tokens != p.k.tokens)
    throw_invalid("query", "tokens must be key tokens - query_offset");
  if (p.k.tokens > 0xffff * kChunkKeys) throw_invalid("key", "tokens must be < 4194240 on CUDA");
  if (p.prefix_length < 0 || p.prefix_length > p.k.tokens) throw_invalid("prefix_length", "must be in [0, T]");
  if (!(std::isfinite(p.scale) && p.scale > 0.0f)) throw_invalid("scale", "must be positive and finite");
}

namespace {

KernelParams make_params(const DeviceProblem& p, int row_end) {
  constexpr float kLog2e = 1.44269504088896340736f;
  KernelParams k{};
  k.q = p.q.data;
  k.k = p.k.data;
  k.v = p.v.data;
  k.out = p.out.data;
  k.q_head_stride = p.q.head_stride, k.q_token_stride = p.q.token_stride;
  k.k_head_stride = p.k.head_stride, k.k_token_stride = p.k.token_stride;
  k.v_head_stride = p.v.head_stride, k.v_token_stride = p.v.token_stride;
  k.out_head_stride = p.out.head_stride, k.out_token_stride = p.out.token_stride;
  k.group = p.q.heads / p.k.heads;
  k.tokens = p.k.tokens;
  k.query_offset = p.query_offset;
  k.row_end = row_end;
  k.causal = p.causal ? 1 : 0;
  k.prefix_length = p.prefix_length;
  k.scale_log2 = p.scale * kLog2e;
  return k;
}

template <typename T, int D, bool kMass>
void launch(const KernelParams& params, int heads, cudaStream_t stream) {
  constexpr int kSmem = (kBlockRows + 4 * kChunkKeys) * D * static_cast<int>(sizeof(T));
  static const bool configured = [] {
    check_cuda(cudaFuncSetAttribute(attention_kernel<T, D, kMass>, cudaFuncAttributeMaxDynamicSharedMemorySize, kSmem),
               "cudaFuncSetAttribute");
    return true;
  }();
  (void)configured;
  const int blocks = ceil_div(params.row_end - params.query_offset, kBlockRows);
  if (blocks == 0) return;
  attention_kernel<T, D, kMass><<<dim3(blocks, heads), kThreads, kSmem, stream>>>(params);
  check_cuda(cudaGetLastError(), "attention kernel launch");
}

template <bool kMass>
void dispatch(const DeviceProblem& p, const KernelParams& params, void* stream) {
  const bool bf16 = p.q.dtype == DType::kBF16;
  const auto s = as_stream(stream);
  if (p.q.dim == 128)
    bf16 ? launch<__nv_bfloat16, 128, kMass>(params, p.q.heads, s) : launch<__half, 128, kMass>(params, p.q.heads, s);
  else
    bf16 ? launch<__nv_bfloat16, 64, kMass>(params, p.q.heads, s) : launch<__half, 64, kMass>(params, p.q.heads, s);
}

template <typename T, int D, bool kMass>
void launch_sparse(const DeviceProblem& problem, const KernelParams& params, cudaStream_t stream) {
  constexpr int kSmem = HopperLayout<D>::kBytes;
  static const bool configured = [] {
    check_cuda(cudaFuncSetAttribute(sparse_hopper_kernel<T, D, kMass>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                    kSmem),
               "cudaFuncSetAttribute");
    return true;
  }();
  (void)configured;
  if (params.row_end <= params.query_offset) return;
  const int blocks = ceil_div(params.row_end, kHopperRows) - params.query_offset / kHopperRows;
  const SparseMaps maps{tile_map(problem.q, params.row_end - params.query_offset, kHopperRows),
                        tile_map(problem.k, problem.k.tokens, kChunkKeys),
                        tile_map(problem.v, problem.v.tokens, kChunkKeys)};
  sparse_hopper_kernel<T, D, kMass><<<dim3(blocks, problem.q.heads), kHopperThreads, kSmem, stream>>>(params, maps);
  check_cuda(cudaGetLastError(), "sparse attention kernel launch");
}

// The sparse kernel for p's dtype and head dim; kMass: recording the tile
// mass (params.mass_log set), a separate instantiation so the sparse hit and
// the plain walk carry none of it.
template <bool kMass>
void dispatch_sparse(const DeviceProblem& p, const KernelParams& params, void* stream) {
  const bool bf16 = p.q.dtype == DType::kBF16;
  const auto s = as_stream(stream);
  if (p.q.dim == 128)
    bf16 ? launch_sparse<__nv_bfloat16, 128, kMass>(p, params, s) : launch_sparse<__half, 128, kMass>(p, params, s);
  else
    bf16 ? launch_sparse<__nv_bfloat16, 64, kMass>(p, params, s) : launch_sparse<__half, 64, kMass>(p, params, s);
}

void check_block(int block) {
  if (block <= 0 || block % kChunkKeys != 0)
    throw_invalid("block", "must be a positive multiple of " + std::to_string(kChunkKeys) + " on CUDA");
}

}  // namespace

// --- DeviceBuffer, DeviceTileMass, DeviceTilePlan ---

DeviceBuffer::DeviceBuffer(std::size_t bytes, void* stream) : data_(nullptr, Free{stream, true}), bytes_(bytes) {
  if (bytes == 0) return;
  void* p = nullptr;
  check_cuda(cudaMallocFromPoolAsync(&p, bytes, scratch_pool(), as_stream(stream)), "cudaMallocFromPoolAsync");
  data_.reset(p);
}

DeviceBuffer::DeviceBuffer(std::size_t bytes) : data_(nullptr, Free{nullptr, false}), bytes_(bytes) {
  if (bytes == 0) return;
  void* p = nullptr;
  check_cuda(cudaMalloc(&p, bytes), "cudaMalloc");
  data_.reset(p);
}

// A destructor cannot throw: an error stays sticky for the next call.
void DeviceBuffer::Free::operator()(void* p) const {
  if (ordered) cudaFreeAsync(p, as_stream(stream));
  else cudaFree(p);
}

TileMass DeviceTileMass::to_host(void* stream) const { return {block, tiles, download<float>(mass, stream)}; }

DeviceTilePlan::DeviceTilePlan(const TileSet& kept, int rows, void* stream) : heads_(kept.heads), rows_(rows) {
  if (kept.block <= 0 || kept.block % kChunkKeys != 0)
    throw_invalid("kept", "block must be a positive multiple of " + std::to_string(kChunkKeys) + " on CUDA");
  if (kept.heads <= 0 || kept.tiles < 0 || kept.offsets.size() != static_cast<std::size_t>(kept.heads) * kept.tiles + 1 ||
      kept.offsets.back() != kept.cols.size())
    throw_invalid("kept", "offsets do not match heads * tiles and cols");
  for (auto col : kept.cols)
    if (col >= kept.tiles) throw_invalid("kept", "tile index out of range");
  if (rows < 0 || rows > kept.tiles * kept.block) throw_invalid("rows", "must be in [0, kept tiles * block]");

  const int blocks = ceil_div(rows, kBlockRows);
  const int chunks_per_tile = kept.block / kChunkKeys;
  // Per block only the chunks its warps keep are touched (a few of hundreds
  // at 32k tokens), so the plan costs what it holds, not blocks x chunks.
  std::vector<std::uint8_t> warps(static_cast<std::size_t>(kept.tiles) * chunks_per_tile);
  std::vector<std::uint32_t> offsets{0}, entries, touched;
  for (int h = 0; h < kept.heads; ++h)
    for (int b = 0; b < blocks; ++b) {
      touched.clear();
      for (int w = 0; w < kWarps && b * kBlockRows + w * kWarpRows < rows; ++w) {
        const std::size_t slot = static_cast<std::size_t>(h) * kept.tiles + (b * kBlockRows + w * kWarpRows) / kept.block;
        for (auto i = kept.offsets[slot]; i < kept.offsets[slot + 1]; ++i)
          for (int c = 0; c < chunks_per_tile; ++c) {
            const std::uint32_t chunk = kept.cols[i] * chunks_per_tile + c;
            if (warps[chunk] == 0) touched.push_back(chunk);
            warps[chunk] |= 1u << w;
          }
      }
      std::sort(touched.begin(), touched.end());  // the kernel walks chunks ascending
      for (std::uint32_t chunk : touched) {
        entries.push_back(chunk | static_cast<std::uint32_t>(warps[chunk]) << 16);
        warps[chunk] = 0;
      }
      offsets.push_back(static_cast<std::uint32_t>(entries.size()));
    }
  upload(offsets, entries, stream, false);
}

DeviceTilePlan::DeviceTilePlan(int rows, void* stream) : heads_(1), rows_(rows) {
  if (rows < 0 || rows > 0xffff * kChunkKeys) throw_invalid("rows", "must be in [0, 4194240]");
  std::vector<std::uint32_t> offsets{0}, entries;
  for (int b = 0; b * kBlockRows < rows; ++b) {
    std::uint32_t warps = 0;  // the block's warps that hold rows
    for (int w = 0; w < kWarps && b * kBlockRows + w * kWarpRows < rows; ++w) warps |= 1u << w;
    const int end = std::min(rows, (b + 1) * kBlockRows);  // keys the block's last row sees
    for (int chunk = 0; chunk * kChunkKeys < end; ++chunk)
      entries.push_back(static_cast<std::uint32_t>(chunk) | warps << 16);
    offsets.push_back(static_cast<std::uint32_t>(entries.size()));
  }
  upload(offsets, entries, stream, true);
}

// Stored plans outlive the stream they were made on, so only a call's own
// plan is stream-ordered.
void DeviceTilePlan::upload(const std::vector<std::uint32_t>& offsets, const std::vector<std::uint32_t>& entries,
                            void* stream, bool stream_ordered) {
  const auto buffer = [&](std::size_t bytes) {
    return stream_ordered ? DeviceBuffer(bytes, stream) : DeviceBuffer(bytes);
  };
  offsets_ = buffer(offsets.size() * sizeof(std::uint32_t));
  entries_ = buffer(entries.size() * sizeof(std::uint32_t));
  // Pageable sources: the copies have read them by the time they return.
  check_cuda(cudaMemcpyAsync(offsets_.data(), offsets.data(), offsets_.bytes(), cudaMemcpyHostToDevice, as_stream(stream)),
             "cudaMemcpyAsync");
  if (!entries.empty())
    check_cuda(cudaMemcpyAsync(entries_.data(), entries.data(), entries_.bytes(), cudaMemcpyHostToDevice,
                               as_stream(stream)),
               "cudaMemcpyAsync");
}

TileSet select_tiles(const DeviceTileMass& mass, double keep_mass, void* stream) {
  if (!(keep_mass >= 0.0 && keep_mass <= 1.0)) throw_invalid("keep_mass", "must be in [0, 1]");
  TileSet kept{mass.block, mass.tiles, mass.heads, {0}, {}};
  const int rows = mass.heads * mass.tiles, words = ceil_div(mass.tiles, 32);
  if (rows == 0) return kept;
  const DeviceBuffer bits(static_cast<std::size_t>(rows) * words * sizeof(std::uint32_t), stream);
  select_tiles_kernel<<<rows, kThreads, 0, as_stream(stream)>>>(static_cast<const float*>(mass.mass.data()), mass.tiles,
                                                                keep_mass, static_cast<std::uint32_t*>(bits.data()), words);
  check_cuda(cudaGetLastError(), "tile selection kernel launch");
  const std::vector<std::uint32_t> host = download<std::uint32_t>(bits, stream);
  for (int r = 0; r < rows; ++r) {
    for (int w = 0; w < words; ++w)
      for (std::uint32_t word = host[static_cast<std::size_t>(r) * words + w]; word != 0; word &= word - 1)
        kept.cols.push_back(static_cast<std::uint16_t>(w * 32 + std::countr_zero(word)));
    kept.offsets.push_back(static_cast<std::uint32_t>(kept.cols.size()));
  }
  return kept;
}

namespace {

// The tile mass from the partials and row log-sum-exps a kernel recorded
// under params (mass_* and row_lse).
void reduce_tile_mass(const KernelParams& params, int prefix, int block, DeviceTileMass& result, void* stream) {
  tile_mass_kernel<<<dim3(result.tiles, result.heads), kThreads, 0, as_stream(stream)>>>(
      params.mass_log, params.row_lse, static_cast<float*>(result.mass.data()), prefix, params.mass_prefix, block,
      result.tiles, params.mass_block, params.mass_tiles, params.causal);
  check_cuda(cudaGetLastError(), "tile mass kernel launch");
}

}  // namespace

// --- entry points ---

void exact_attention(const DeviceProblem& problem, void* stream) {
  check_problem(problem);
  dispatch<false>(problem, make_params(problem, problem.k.tokens), stream);
}

DeviceTileMass exact_attention_with_tile_mass(const DeviceProblem& problem, int prefix, int block, void* stream) {
  check_problem(problem);
  check_block(block);
  if (problem.query_offset != 0) throw_invalid("problem", "query_offset must be 0 to record tile mass");
  if (prefix < 0 || prefix > problem.k.tokens) throw_invalid("prefix", "must be in [0, T]");
  if (!problem.causal && problem.prefix_length != prefix)
    throw_invalid("prefix", "must equal the problem's prefix_length for non-causal tile mass");
  const int heads = problem.q.heads, tiles = ceil_div(prefix, block);
  DeviceTileMass result{block, tiles, heads,
                        DeviceBuffer(static_cast<std::size_t>(heads) * tiles * tiles * sizeof(float), stream)};
  KernelParams params = make_params(problem, problem.k.tokens);
  if (prefix == 0) {
    dispatch<false>(problem, params, stream);
    return result;
  }
  const DeviceBuffer log(static_cast<std::size_t>(heads) * tiles * prefix * sizeof(float), stream);
  const DeviceBuffer lse(static_cast<std::size_t>(heads) * prefix * sizeof(float), stream);
  params.mass_log = static_cast<float*>(log.data());
  params.row_lse = static_cast<float*>(lse.data());
  params.mass_prefix = prefix;
  params.mass_block = block;
  params.mass_tiles = tiles;
  dispatch<true>(problem, params, stream);
  reduce_tile_mass(params, prefix, block, result, stream);
  return result;
}

void sparse_attention(const DeviceProblem& problem, const DeviceTilePlan& plan, void* stream, int rows) {
  check_problem(problem);
  if (rows < 0) rows = plan.rows();
  if (problem.query_offset != 0) throw_invalid("problem", "query_offset must be 0 for prefix rows");
  if (plan.heads() != problem.q.heads) throw_invalid("plan", "heads != the problem's query heads");
  if (rows > plan.rows() || rows > problem.k.tokens) throw_invalid("rows", "must be <= the plan's rows and T");
  KernelParams params = make_params(problem, rows);
  params.plan_offsets = plan.offsets();
  params.plan_entries = plan.entries();
  params.plan_head_stride = ceil_div(plan.rows(), kBlockRows);
  dispatch_sparse<false>(problem, params, stream);
}

namespace {

// The dense walk's parameters: rows [query_offset, T) over `plan`, every
// causal chunk of one head, shared by all heads.
KernelParams dense_walk_params(const DeviceProblem& problem, const DeviceTilePlan& plan) {
  KernelParams params = make_params(problem, problem.k.tokens);
  params.plan_offsets = plan.offsets();
  params.plan_entries = plan.entries();
  params.plan_head_stride = 0;
  params.mass_prefix = problem.k.tokens;  // row stride of row_lse and mass_log
  return params;
}

}  // namespace

void dense_causal_attention(const DeviceProblem& problem, float* row_lse, void* stream) {
  check_problem(problem);
  if (!problem.causal) throw_invalid("problem", "the dense walk takes causal problems");
  if (row_lse != nullptr && problem.query_offset != 0) throw_invalid("row_lse", "needs query_offset 0");
  if (problem.k.tokens == problem.query_offset) return;
  const DeviceTilePlan plan(problem.k.tokens, stream);
  KernelParams params = dense_walk_params(problem, plan);
  params.row_lse = row_lse;
  dispatch_sparse<false>(problem, params, stream);
}

DeviceTileMass dense_causal_attention_with_tile_mass(const DeviceProblem& problem, int prefix, int block,
                                                    void* stream) {
  check_problem(problem);
  check_block(block);
  if (!problem.causal) throw_invalid("problem", "the dense walk takes causal problems");
  if (problem.query_offset != 0) throw_invalid("problem", "query_offset must be 0 to record tile mass");
  const int rows = problem.k.tokens, heads = problem.q.heads, tiles = ceil_div(prefix, block);
  if (prefix < 0 || prefix > rows) throw_invalid("prefix", "must be in [0, T]");
  DeviceTileMass result{block, tiles, heads,
                        DeviceBuffer(static_cast<std::size_t>(heads) * tiles * tiles * sizeof(float), stream)};
  if (prefix == 0) {
    dense_causal_attention(problem, nullptr, stream);
    return result;
  }
  const int chunks = ceil_div(prefix, kChunkKeys);
  const DeviceBuffer log(static_cast<std::size_t>(heads) * chunks * rows * sizeof(float), stream);
  const DeviceBuffer lse(static_cast<std::size_t>(heads) * rows * sizeof(float), stream);
  const DeviceTilePlan plan(rows, stream);
  KernelParams params = dense_walk_params(problem, plan);
  params.row_lse = static_cast<float*>(lse.data());
  params.mass_log = static_cast<float*>(log.data());
  params.mass_block = kChunkKeys;
  params.mass_tiles = chunks;
  dispatch_sparse<true>(problem, params, stream);
  reduce_tile_mass(params, prefix, block, result, stream);
  return result;
}

void copy_rows(const DeviceHeads& src, const MutableDeviceHeads& dst, int rows, void* stream) {
  check_view("src", src);
  check_view("dst", dst);
  if (dst.heads != src.heads || dst.dim != src.dim || dst.dtype != src.dtype)
    throw_invalid("dst", "heads, dim and dtype must match src's");
  if (src.dim % 8 != 0) throw_invalid("src", "dim must be a multiple of 8");
  if (rows < 0 || rows > src.tokens || rows > dst.tokens) throw_invalid("rows", "must be in [0, min(src, dst tokens)]");
  if (rows == 0) return;
  const int pieces = src.dim / 8;  // 16-byte pieces of a 2-byte row
  if (static_cast<std::int64_t>(rows) * pieces > std::numeric_limits<int>::max() - kCopyThreads * kCopyUnroll)
    throw_invalid("rows", "times dim / 8 must fit in an int");
  if (src.heads > 65535) throw_invalid("src", "at most 65535 heads");
  const int per_block = kCopyThreads * kCopyUnroll;
  const dim3 grid((rows * pieces + per_block - 1) / per_block, src.heads);
  const auto copy = src.token_stride == src.dim && dst.token_stride == dst.dim ? copy_rows_kernel<true>
                                                                                : copy_rows_kernel<false>;
  copy<<<grid, kCopyThreads, 0, as_stream(stream)>>>(static_cast<const uint4*>(src.data), src.head_stride / 8,
                                                     src.token_stride / 8, static_cast<uint4*>(dst.data),
                                                     dst.head_stride / 8, dst.token_stride / 8, rows, pieces);
  check_cuda(cudaGetLastError(), "copy kernel launch");
}

// --- k fingerprint and guard rows ---

namespace {

constexpr std::uint64_t kHashMul = 0x9fb21c651e98df25ULL;

__host__ __device__ std::uint64_t hash_step(std::uint64_t h, std::uint64_t word) {
  h = (h ^ word) * kHashMul;
  return h ^ (h >> 32);
}

// One thread per (head, token) row: its 8-byte words hashed from a seed of
// the row's index, so equal rows at other positions differ; rows summed mod
// 2^64, which no scheduling order changes. Strides in bytes.
__global__ void fingerprint_kernel(const unsigned char* k, std::int64_t head_stride, std::int64_t token_stride,
                                   int heads, int prefix, int words, unsigned long long* sum) {
  unsigned long long local = 0;
  const std::int64_t total = static_cast<std::int64_t>(heads) * prefix;
  for (std::int64_t i = blockIdx.x * static_cast<std::int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<std::int64_t>(gridDim.x) * blockDim.x) {
    const auto* row = reinterpret_cast<const std::uint64_t*>(k + (i / prefix) * head_stride + (i % prefix) * token_stride);
    std::uint64_t h = hash_step(0x243f6a8885a308d3ULL, static_cast<std::uint64_t>(i));
    for (int w = 0; w < words; ++w) h = hash_step(h, row[w]);
    local += h;
  }
  for (int o = 16; o > 0; o >>= 1) local += __shfl_xor_sync(0xffffffffu, local, o);
  if ((threadIdx.x & 31) == 0) atomicAdd(sum, local);
}

// Keys per block of the guard's row kernel: enough blocks to fill the GPU
// with 8 rows of a few heads, few enough partial states to combine.
constexpr int kGuardSplit = 1024;

// One block per (guard row, head, split of kGuardSplit keys): its warps take
// every kWarps-th key, each lane D/32 dims; the split's online-softmax state
// (m in log2 units, l, o[D]) goes to partial[(r, head, split)].
template <typename T, int D>
__global__ void guard_partials_kernel(KernelParams p, const int* rows, int splits, float* partial) {
  constexpr int kPer = D / 32;
  const int r = blockIdx.x, head = blockIdx.y, split = blockIdx.z;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int row = rows[r], begin = split * kGuardSplit, end = min(key_end(p, row), begin + kGuardSplit);
  const int kv = head / p.group;
  const T* q = static_cast<const T*>(p.q) + head * p.q_head_stride + (row - p.query_offset) * p.q_token_stride;
  const T* kh = static_cast<const T*>(p.k) + kv * p.k_head_stride + lane * kPer;
  const T* vh = static_cast<const T*>(p.v) + kv * p.v_head_stride + lane * kPer;
  float qf[kPer], o[kPer];
  for (int i = 0; i < kPer; ++i) qf[i] = to_float(q[lane * kPer + i]) * p.scale_log2, o[i] = 0.0f;
  float m = -INFINITY, l = 0.0f;
  for (int j = begin + warp; j < end; j += kWarps) {
    float s = 0.0f;
    for (int i = 0; i < kPer; ++i) s += qf[i] * to_float(kh[j * p.k_token_stride + i]);
    for (int off = 16; off > 0; off >>= 1) s += __shfl_xor_sync(0xffffffffu, s, off);
    const float m_new = fmaxf(m, s), alpha = exp2f(m - m_new), e = exp2f(s - m_new);
    l = l * alpha + e;
    for (int i = 0; i < kPer; ++i) o[i] = o[i] * alpha + e * to_float(vh[j * p.v_token_stride + i]);
    m = m_new;
  }
  __shared__ float warp_m[kWarps], warp_l[kWarps], warp_o[kWarps][D];
  if (lane == 0) warp_m[warp] = m, warp_l[warp] = l;
  for (int i = 0; i < kPer; ++i) warp_o[warp][lane * kPer + i] = o[i];
  __syncthreads();
  if (warp != 0) return;
  float top = -INFINITY, weight[kWarps], sum = 0.0f;
  for (int w = 0; w < kWarps; ++w) top = fmaxf(top, warp_m[w]);
  for (int w = 0; w < kWarps; ++w) {
    weight[w] = warp_m[w] == -INFINITY ? 0.0f : exp2f(warp_m[w] - top);
    sum += weight[w] * warp_l[w];
  }
  float* state = partial + ((static_cast<std::int64_t>(r) * gridDim.y + head) * splits + split) * (D + 2);
  for (int i = 0; i < kPer; ++i) {
    float acc = 0.0f;
    for (int w = 0; w < kWarps; ++w) acc += weight[w] * warp_o[w][lane * kPer + i];
    state[2 + lane * kPer + i] = acc;
  }
  if (lane == 0) state[0] = top, state[1] = sum;
}

// One block of D threads per head: each guard row's split states combined
// into the exact row and compared with out's row; error[head] gets
// ||out - exact|| / ||exact|| over the rows.
template <typename T, int D>
__global__ void guard_error_kernel(KernelParams p, const int* rows, int count, int splits, const float* partial,
                                   float* error) {
  const int head = blockIdx.x, d = threadIdx.x;
  double diff2 = 0.0, ref2 = 0.0;
  for (int r = 0; r < count; ++r) {
    const float* states = partial + (static_cast<std::int64_t>(r) * gridDim.x + head) * splits * (D + 2);
    float top = -INFINITY, sum = 0.0f, acc = 0.0f;
    for (int s = 0; s < splits; ++s) top = fmaxf(top, states[s * (D + 2)]);
    for (int s = 0; s < splits; ++s) {
      const float* st = states + s * (D + 2);
      if (st[0] == -INFINITY) continue;  // a split past the row's keys
      const float w = exp2f(st[0] - top);
      sum += w * st[1];
      acc += w * st[2 + d];
    }
    const double exact = acc / sum;
    const T* out = static_cast<const T*>(p.out) + head * p.out_head_stride + (rows[r] - p.query_offset) * p.out_token_stride;
    const double diff = to_float(out[d]) - exact;
    diff2 += diff * diff;
    ref2 += exact * exact;
  }
  __shared__ double shared[2][D / 32];
  for (int o = 16; o > 0; o >>= 1) {
    diff2 += __shfl_xor_sync(0xffffffffu, diff2, o);
    ref2 += __shfl_xor_sync(0xffffffffu, ref2, o);
  }
  if ((d & 31) == 0) shared[0][d / 32] = diff2, shared[1][d / 32] = ref2;
  __syncthreads();
  if (d != 0) return;
  diff2 = ref2 = 0.0;
  for (int w = 0; w < D / 32; ++w) diff2 += shared[0][w], ref2 += shared[1][w];
  error[head] = static_cast<float>(ref2 > 0.0 ? sqrt(diff2 / ref2) : sqrt(diff2));
}

// f.template operator()<T, D>() for the problem's dtype and head dim.
template <typename F>
void with_types(const DeviceProblem& p, F&& f) {
  const bool bf16 = p.q.dtype == DType::kBF16;
  if (p.q.dim == 128)
    bf16 ? f.template operator()<__nv_bfloat16, 128>() : f.template operator()<__half, 128>();
  else
    bf16 ? f.template operator()<__nv_bfloat16, 64>() : f.template operator()<__half, 64>();
}

}  // namespace

std::uint64_t k_fingerprint(const DeviceHeads& k, int prefix, void* stream) {
  check_view("key", k);
  if (k.dtype != DType::kF16 && k.dtype != DType::kBF16) throw_invalid("key", "dtype must be float16 or bfloat16");
  if (k.dim % 4 != 0) throw_invalid("key", "dim must be a multiple of 4");
  if (prefix < 0 || prefix > k.tokens) throw_invalid("prefix", "must be in [0, key tokens]");
  const DeviceBuffer sum(sizeof(std::uint64_t), stream);
  check_cuda(cudaMemsetAsync(sum.data(), 0, sum.bytes(), as_stream(stream)), "cudaMemsetAsync");
  const std::int64_t rows = static_cast<std::int64_t>(k.heads) * prefix;
  if (rows > 0) {
    const int blocks = static_cast<int>(std::min<std::int64_t>((rows + 255) / 256, 132 * 8));
    fingerprint_kernel<<<blocks, 256, 0, as_stream(stream)>>>(
        static_cast<const unsigned char*>(k.data), k.head_stride * 2, k.token_stride * 2, k.heads, prefix, k.dim / 4,
        static_cast<unsigned long long*>(sum.data()));
    check_cuda(cudaGetLastError(), "fingerprint kernel launch");
  }
  return hash_step(download<std::uint64_t>(sum, stream)[0], static_cast<std::uint64_t>(rows));
}

double max_row_error(const DeviceProblem& problem, std::span<const int> rows, void* stream) {
  check_problem(problem);
  if (problem.query_offset != 0) throw_invalid("problem", "query_offset must be 0 for guard rows");
  for (std::size_t r = 0; r < rows.size(); ++r)
    if (rows[r] < 0 || rows[r] >= problem.k.tokens || (r > 0 && rows[r] <= rows[r - 1]))
      throw_invalid("rows", "must be ascending positions in [0, T)");
  if (rows.empty()) return 0.0;
  const int heads = problem.q.heads, count = static_cast<int>(rows.size()), dim = problem.q.dim;
  const KernelParams params = make_params(problem, problem.k.tokens);
  const int last = rows.back();
  const int keys = problem.causal ? last + 1 : (last < problem.prefix_length ? problem.prefix_length : problem.k.tokens);
  const int splits = ceil_div(keys, kGuardSplit);
  const DeviceBuffer row_list(rows.size_bytes(), stream);
  const DeviceBuffer partial(static_cast<std::size_t>(count) * heads * splits * (dim + 2) * sizeof(float), stream);
  const DeviceBuffer error(static_cast<std::size_t>(heads) * sizeof(float), stream);
  // Pageable source: the copy has read it by the time it returns.
  check_cuda(cudaMemcpyAsync(row_list.data(), rows.data(), rows.size_bytes(), cudaMemcpyHostToDevice, as_stream(stream)),
             "cudaMemcpyAsync");
  const auto* row_data = static_cast<const int*>(row_list.data());
  with_types(problem, [&]<typename T, int D>() {
    guard_partials_kernel<T, D><<<dim3(count, heads, splits), kThreads, 0, as_stream(stream)>>>(
        params, row_data, splits, static_cast<float*>(partial.data()));
    guard_error_kernel<T, D><<<heads, D, 0, as_stream(stream)>>>(params, row_data, count, splits,
                                                                  static_cast<const float*>(partial.data()),
                                                                  static_cast<float*>(error.data()));
  });
  check_cuda(cudaGetLastError(), "guard kernel launch");
  const std::vector<float> per_head = download<float>(error, stream);
  return *std::max_element(per_head.begin(), per_head.end());
}

}  // namespace attention_echo::kernels::cuda
