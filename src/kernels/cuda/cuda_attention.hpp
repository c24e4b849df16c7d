// The CUDA kernels (built with -DAE_CUDA=ON, which defines AE_HAVE_CUDA):
// FlashAttention-2-style exact attention on fp16/bf16 views in device memory
// with fp32 accumulation, the same kernel over a cached kept-tile plan (the
// sparse tier's hit), the tile-mass capture a sparse miss needs, and the exact
// tier's row copy. Every call is asynchronous on the caller's stream; nothing
// here synchronises the device except where a function says so.
//
// Semantics are the host kernels' (attention_kernel.hpp): rows are sequence
// positions, q and out hold positions [query_offset, T); causal rows see keys
// j <= i; non-causal rows i < prefix_length see the prefix keys, the others
// every key. Key tiles are aligned at token 0 and walked in ascending order,
// so a row gets the same bits from every entry point (exact, with or without
// mass capture, sparse with every tile kept).
//
// This header needs no CUDA headers: streams are passed as void*
// (a cudaStream_t; nullptr is the legacy default stream).
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <span>

#include "kernels/attention_kernel.hpp"

namespace attention_echo::kernels::cuda {

// The library's dtype; the kernels take kF16 and kBF16.
using attention_echo::DType;

// Per-head token rows in device memory: the library's views of any dtype
// (tensor.hpp). The kernels run on the current device and check that each
// pointer is that device's memory; they do not read the view's device
// label. They load 16-byte vectors: data must be 16-byte aligned and both
// strides multiples of 8 elements.
using DeviceHeads = AnyHeadsView;
using MutableDeviceHeads = MutableAnyHeadsView;

struct DeviceProblem {
  DeviceHeads q;           // [H, T - query_offset, D]
  DeviceHeads k;           // [Hkv, T, D]
  DeviceHeads v;           // [Hkv, T, D]
  MutableDeviceHeads out;  // like q
  float scale = 1.0f;  // positive
  bool causal = true;
  int prefix_length = 0;
  int query_offset = 0;
};

// Device memory of the current device. With a stream: scratch a call
// allocates and frees in the order of that stream (cudaMallocFromPoolAsync /
// cudaFreeAsync, from a pool of the backend's that keeps freed memory for
// the next call). Without: memory that outlives the call that made it (cache
// payloads, plans), freed with cudaFree, which waits for the device's queued
// work, since a kernel any stream queued may still read it and the stream
// that made it may be gone.
class DeviceBuffer {
 public:
  DeviceBuffer() = default;
  DeviceBuffer(std::size_t bytes, void* stream);
  explicit DeviceBuffer(std::size_t bytes);
  void* data() const { return data_.get(); }
  std::size_t bytes() const { return bytes_; }

 private:
  struct Free {
    void* stream;
    bool ordered;
    void operator()(void* p) const;
  };
  std::unique_ptr<void, Free> data_{nullptr, Free{nullptr, false}};
  std::size_t bytes_ = 0;
};

// The tile mass of a miss, on the device: mass[(h * tiles + I) * tiles + J]
// as TileMass defines it (float32).
struct DeviceTileMass {
  int block = 0;
  int tiles = 0;
  int heads = 0;
  DeviceBuffer mass;

  // Copies it to the host (synchronises the stream): the form select_tiles reads.
  TileMass to_host(void* stream) const;
};

// A TileSet as the sparse kernel walks it: per (query head, block of
// kRowsPerBlock rows) the ascending key chunks any of its warps keeps, each
// with a bit per warp that keeps it. Built once per cached kept set and kept
// on the device (memory that outlives the stream it was made on).
class DeviceTilePlan {
 public:
  // kept.block must be a positive multiple of 64; rows is the number of
  // prefix rows the plan serves (<= kept.tiles * kept.block).
  DeviceTilePlan(const TileSet& kept, int rows, void* stream);
  // One head's every causal chunk of rows [0, rows): the dense causal walk
  // (dense_causal_attention), shared by all heads. A call's own: its memory
  // is stream-ordered on `stream`.
  DeviceTilePlan(int rows, void* stream);
  int heads() const { return heads_; }
  int rows() const { return rows_; }
  std::size_t bytes() const { return offsets_.bytes() + entries_.bytes(); }
  const std::uint32_t* offsets() const { return static_cast<const std::uint32_t*>(offsets_.data()); }
  const std::uint32_t* entries() const { return static_cast<const std::uint32_t*>(entries_.data()); }

 private:
  void upload(const std::vector<std::uint32_t>& offsets, const std::vector<std::uint32_t>& entries, void* stream,
              bool stream_ordered);

  int heads_ = 0;
  int rows_ = 0;
  DeviceBuffer offsets_;
  DeviceBuffer entries_;
};

// The kept tiles of a recorded tile mass, as select_tiles
// (attention_kernel.hpp) keeps them, selected on the device: only a bit per
// tile comes to the host. Waits for the stream.
TileSet select_tiles(const DeviceTileMass& mass, double keep_mass, void* stream);

// Query rows per thread block of the attention kernel.
inline constexpr int kRowsPerBlock = 128;

// Exact rows [query_offset, T) of every head into problem.out.
void exact_attention(const DeviceProblem& problem, void* stream);

// Exact rows [0, T) plus the tile mass of the prefix block [0, prefix) in
// tiles of `block` tokens (a positive multiple of 64). Needs query_offset 0;
// non-causal needs prefix_length == prefix. The output bits are
// exact_attention's.
DeviceTileMass exact_attention_with_tile_mass(const DeviceProblem& problem, int prefix, int block, void* stream);

// Prefix rows [0, rows) of every head (rows <= plan.rows(); -1: all of the
// plan's) over their kept key tiles only (clipped to each row's own keys).
// Needs query_offset 0. With every tile kept it is exact attention (within
// rounding of exact_attention: another kernel, on wgmma).
void sparse_attention(const DeviceProblem& problem, const DeviceTilePlan& plan, void* stream, int rows = -1);

// Exact rows [query_offset, T) of a causal problem by the sparse kernel
// walking every causal chunk: on an H200 1.05-1.14x cuDNN's time and half
// exact_attention's (BENCHMARKS.md section 6), so a miss that cuDNN does not
// take runs here. A row's bits do not depend on query_offset (an exact hit's
// recomputed suffix equals the miss's). row_lse (device memory, may be null;
// query_offset 0 only) gets each row's natural-log log-sum-exp, [heads, T],
// as cudnn_attention writes it.
void dense_causal_attention(const DeviceProblem& problem, float* row_lse, void* stream);

// dense_causal_attention's rows [0, T) (the same bits) plus the exact tile
// mass of the prefix block [0, prefix) in tiles of `block` tokens (a
// positive multiple of 64), recorded in the same pass: each row's sum of p
// over every 64-key chunk, then a small kernel against the rows'
// log-sum-exp. On an H200 it costs less than sampling 8 rows of every
// 64-token tile after the miss (BENCHMARKS.md section 6). Needs query_offset 0.
DeviceTileMass dense_causal_attention_with_tile_mass(const DeviceProblem& problem, int prefix, int block,
                                                    void* stream);

// Throws std::invalid_argument naming the argument unless the kernels run
// the problem: every view in memory of the current device, 16-byte aligned
// with strides of 8 elements, one dtype (float16 or bfloat16), head dim 64 or
// 128, consistent shapes. Every entry point checks it.
void check_problem(const DeviceProblem& problem);

// A hash of k's rows [0, prefix) of every head: each row's bytes hashed with
// its (head, token) as seed, the row hashes summed (an order-free reduction,
// so the value is the same every run). Waits for the stream.
std::uint64_t k_fingerprint(const DeviceHeads& k, int prefix, void* stream);

// The verification guard's measure on the device: over the positions `rows`
// (ascending, query_offset 0) of problem.out, the maximum over heads of
// ||out - exact|| / ||exact|| (||out - exact|| where exact is 0), the exact
// rows computed in float32 (split over key ranges, then combined) and
// compared without being written. Waits for the stream.
double max_row_error(const DeviceProblem& problem, std::span<const int> rows, void* stream);

// Rows [0, rows) of every head from src to dst (the exact tier's copy of
// prefix output rows into and out of its stored payload).
void copy_rows(const DeviceHeads& src, const MutableDeviceHeads& dst, int rows, void* stream);

}  // namespace attention_echo::kernels::cuda
