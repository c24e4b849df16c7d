// A C interface over the CUDA kernels for bench_cuda.py (ctypes), so our
// kernels and PyTorch's run side by side in one process on the same tensors
// and the caller's stream. Each function returns 0, or -1 with the message in
// ae_last_error(). Views are (pointer, head stride, token stride) in elements;
// k and v share strides.
#include <cuda_runtime.h>

#include <cstdint>
#include <exception>
#include <stdexcept>
#include <string>

#include "kernels/cuda/cuda_attention.hpp"
#include "kernels/cuda/cudnn_attention.hpp"
#include "kernels/cuda/miss_attention.hpp"
#include "kernels/cuda/tile_mass_capture.hpp"

using namespace attention_echo::kernels;
using namespace attention_echo::kernels::cuda;

namespace {

thread_local std::string last_error;

template <typename F>
int guarded(F&& f) {
  try {
    f();
    return 0;
  } catch (const std::exception& e) {
    last_error = e.what();
    return -1;
  }
}

DType dtype_of(int bf16) { return bf16 ? DType::kBF16 : DType::kF16; }

DeviceProblem problem(const void* q, std::int64_t q_hs, std::int64_t q_ts, const void* k, const void* v,
                      std::int64_t kv_hs, std::int64_t kv_ts, void* out, std::int64_t o_hs, std::int64_t o_ts,
                      int bf16, int heads, int kv_heads, int tokens, int dim, int causal, int prefix_length,
                      int query_offset, float scale) {
  const DType t = dtype_of(bf16);
  const int rows = tokens - query_offset;
  return {{q, t, heads, rows, dim, q_hs, q_ts},
          {k, t, kv_heads, tokens, dim, kv_hs, kv_ts},
          {v, t, kv_heads, tokens, dim, kv_hs, kv_ts},
          {out, t, heads, rows, dim, o_hs, o_ts},
          scale,
          causal != 0,
          prefix_length,
          query_offset};
}

}  // namespace

#define AE_PROBLEM_ARGS                                                                                         \
  const void *q, std::int64_t q_hs, std::int64_t q_ts, const void *k, const void *v, std::int64_t kv_hs,        \
      std::int64_t kv_ts, void *out, std::int64_t o_hs, std::int64_t o_ts, int bf16, int heads, int kv_heads, \
      int tokens, int dim, int causal, int prefix_length, int query_offset, float scale
#define AE_PROBLEM                                                                                               \
  problem(q, q_hs, q_ts, k, v, kv_hs, kv_ts, out, o_hs, o_ts, bf16, heads, kv_heads, tokens, dim, causal, \
          prefix_length, query_offset, scale)

// mass_out (device, may be null) receives the mass, [heads, tiles, tiles] float32.
void copy_mass(const DeviceTileMass& mass, float* mass_out, void* stream) {
  if (mass_out != nullptr && mass.mass.bytes() > 0 &&
      cudaMemcpyAsync(mass_out, mass.mass.data(), mass.mass.bytes(), cudaMemcpyDeviceToDevice,
                      static_cast<cudaStream_t>(stream)) != cudaSuccess)
    throw std::runtime_error("cudaMemcpyAsync failed");
}

extern "C" {

const char* ae_last_error() { return last_error.c_str(); }

int ae_attention(AE_PROBLEM_ARGS, void* stream) {
  return guarded([&] { exact_attention(AE_PROBLEM, stream); });
}

// mass_out (device, may be null) receives [heads, tiles, tiles] float32.
int ae_attention_mass(AE_PROBLEM_ARGS, int prefix, int block, float* mass_out, void* stream) {
  return guarded([&] {
    const DeviceTileMass mass = exact_attention_with_tile_mass(AE_PROBLEM, prefix, block, stream);
    copy_mass(mass, mass_out, stream);
  });
}

int ae_cudnn_version() { return cudnn_available() ? cudnn_version() : 0; }

// cuDNN's dense attention; row_lse (device, may be null) gets [heads, rows]
// float32 natural-log LSE. Fails where cuDNN refuses the problem.
int ae_cudnn_attention(AE_PROBLEM_ARGS, float* row_lse, void* stream) {
  return guarded([&] {
    if (!cudnn_attention(AE_PROBLEM, row_lse, stream)) throw std::runtime_error("cuDNN cannot run this problem");
  });
}

// The tile-mass capture from row_lse ([heads, T], query_offset 0) with
// `samples` rows per tile; mass_out as in ae_attention_mass.
int ae_capture_mass(AE_PROBLEM_ARGS, const float* row_lse, int prefix, int block, int samples, float* mass_out,
                    void* stream) {
  return guarded([&] {
    const DeviceTileMass mass = capture_tile_mass(AE_PROBLEM, row_lse, prefix, block, samples, stream);
    copy_mass(mass, mass_out, stream);
  });
}

// The routed miss with tile mass (cuDNN + capture, or our fused kernel).
int ae_miss_mass(AE_PROBLEM_ARGS, int prefix, int block, int samples, void* stream) {
  return guarded([&] { miss_attention_with_tile_mass(AE_PROBLEM, prefix, block, stream, samples); });
}

// The dense causal walk (dense_causal_attention); row_lse as in ae_cudnn_attention.
int ae_walk(AE_PROBLEM_ARGS, float* row_lse, void* stream) {
  return guarded([&] { dense_causal_attention(AE_PROBLEM, row_lse, stream); });
}

// The walk recording the exact tile mass in the same pass; mass_out as in ae_attention_mass.
int ae_walk_mass(AE_PROBLEM_ARGS, int prefix, int block, float* mass_out, void* stream) {
  return guarded([&] {
    const DeviceTileMass mass = dense_causal_attention_with_tile_mass(AE_PROBLEM, prefix, block, stream);
    copy_mass(mass, mass_out, stream);
  });
}

// A kept set in TileSet's CSR form (host arrays) as a device plan; null on error.
void* ae_plan_create(const std::uint32_t* offsets, const std::uint16_t* cols, int heads, int tiles, int block,
                     int rows, void* stream) {
  void* plan = nullptr;
  guarded([&] {
    TileSet kept{block, tiles, heads, {}, {}};
    kept.offsets.assign(offsets, offsets + static_cast<std::size_t>(heads) * tiles + 1);
    kept.cols.assign(cols, cols + kept.offsets.back());
    plan = new DeviceTilePlan(kept, rows, stream);
  });
  return plan;
}

void ae_plan_destroy(void* plan) { delete static_cast<DeviceTilePlan*>(plan); }

int ae_sparse(AE_PROBLEM_ARGS, const void* plan, void* stream) {
  return guarded([&] { sparse_attention(AE_PROBLEM, *static_cast<const DeviceTilePlan*>(plan), stream); });
}

int ae_copy_rows(const void* src, std::int64_t s_hs, std::int64_t s_ts, void* dst, std::int64_t d_hs,
                 std::int64_t d_ts, int bf16, int heads, int tokens, int dim, int rows, void* stream) {
  return guarded([&] {
    const DType t = dtype_of(bf16);
    copy_rows({src, t, heads, tokens, dim, s_hs, s_ts}, {dst, t, heads, tokens, dim, d_hs, d_ts}, rows, stream);
  });
}

}  // extern "C"
