// What the CUDA tests share: fp16/bf16 tensors on the device with their
// rounded values on the host, one attention problem of them, and the float64
// reference its rows are checked against.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <random>
#include <stdexcept>
#include <vector>

#include "kernels/cuda/cuda_attention.hpp"

namespace attention_echo::kernels::cuda::testing {

inline void ok(cudaError_t status) {
  if (status != cudaSuccess) throw std::runtime_error(cudaGetErrorString(status));
}

// fp16/bf16 bits <-> float on the host.
inline std::uint16_t to_bits(float x, DType dtype) {
  std::uint16_t bits;
  if (dtype == DType::kBF16) {
    const __nv_bfloat16 v = __float2bfloat16(x);
    std::memcpy(&bits, &v, 2);
  } else {
    const __half v = __float2half(x);
    std::memcpy(&bits, &v, 2);
  }
  return bits;
}
inline float from_bits(std::uint16_t bits, DType dtype) {
  if (dtype == DType::kBF16) {
    __nv_bfloat16 v;
    std::memcpy(&v, &bits, 2);
    return __bfloat162float(v);
  }
  __half v;
  std::memcpy(&v, &bits, 2);
  return __half2float(v);
}

// One [heads, tokens, dim] tensor on the device and its rounded values on the host.
struct Tensor {
  int heads, tokens, dim;
  DType dtype;
  std::vector<float> host;
  void* device = nullptr;

  Tensor(int h, int t, int d, DType type) : heads(h), tokens(t), dim(d), dtype(type), host(size()) {
    ok(cudaMalloc(&device, bytes()));
  }
  Tensor(const Tensor&) = delete;
  ~Tensor() { cudaFree(device); }
  std::size_t size() const { return static_cast<std::size_t>(heads) * tokens * dim; }
  std::size_t bytes() const { return size() * 2; }
  float at(int h, int t, int d) const { return host[(static_cast<std::size_t>(h) * tokens + t) * dim + d]; }

  // Values mean + sigma * N(0, 1), rounded to dtype, uploaded.
  void fill(std::mt19937& rng, float mean, float sigma) {
    std::normal_distribution<float> normal(mean, sigma);
    std::vector<float> values(size());
    for (float& x : values) x = normal(rng);
    upload(values);
  }
  // These values, rounded to dtype, uploaded.
  void upload(const std::vector<float>& values) {
    std::vector<std::uint16_t> bits(size());
    for (std::size_t i = 0; i < size(); ++i) {
      bits[i] = to_bits(values[i], dtype);
      host[i] = from_bits(bits[i], dtype);
    }
    ok(cudaMemcpy(device, bits.data(), bytes(), cudaMemcpyHostToDevice));
  }
  // All bits set: NaN in fp16 and bf16, so an unwritten element shows.
  void poison() { ok(cudaMemset(device, 0xff, bytes())); }
  std::vector<float> download() const {
    std::vector<std::uint16_t> bits(size());
    ok(cudaMemcpy(bits.data(), device, bytes(), cudaMemcpyDeviceToHost));
    std::vector<float> out(size());
    for (std::size_t i = 0; i < size(); ++i) out[i] = from_bits(bits[i], dtype);
    return out;
  }
  std::vector<std::uint16_t> download_bits() const {
    std::vector<std::uint16_t> bits(size());
    ok(cudaMemcpy(bits.data(), device, bytes(), cudaMemcpyDeviceToHost));
    return bits;
  }
  // [heads, tokens, dim] on CUDA device 0.
  DeviceHeads view() const { return DeviceHeads::contiguous(device, dtype, heads, tokens, dim, Device::cuda(0)); }
  MutableDeviceHeads mutable_view() {
    return MutableDeviceHeads::contiguous(device, dtype, heads, tokens, dim, Device::cuda(0));
  }
};

struct Case {
  int heads, kv_heads, tokens, dim;
  DType dtype;
  bool causal = true;
  int prefix_length = 0;
  int query_offset = 0;
  float mean = 0.0f, sigma = 1.0f;  // of q and k
};

// q, k, v and out of one problem, filled with fresh random values.
struct Problem {
  Case c;
  Tensor q, k, v, out;
  Problem(const Case& cs, unsigned seed)
      : c(cs),
        q(cs.heads, cs.tokens - cs.query_offset, cs.dim, cs.dtype),
        k(cs.kv_heads, cs.tokens, cs.dim, cs.dtype),
        v(cs.kv_heads, cs.tokens, cs.dim, cs.dtype),
        out(cs.heads, cs.tokens - cs.query_offset, cs.dim, cs.dtype) {
    std::mt19937 rng(seed);
    q.fill(rng, cs.mean, cs.sigma);
    k.fill(rng, cs.mean, cs.sigma);
    v.fill(rng, 0.0f, 1.0f);
    out.poison();
  }
  float scale() const { return 1.0f / std::sqrt(static_cast<float>(c.dim)); }
  DeviceProblem device() {
    return {q.view(), k.view(), v.view(), out.mutable_view(), scale(), c.causal, c.prefix_length, c.query_offset};
  }
  int key_end(int i) const {
    if (c.causal) return i + 1;
    return i < c.prefix_length ? c.prefix_length : c.tokens;
  }
  int kv(int h) const { return h / (c.heads / c.kv_heads); }

  // Softmax probabilities of row i (a position) of head h over keys
  // [0, key_end(i)) that `allowed` admits, in float64.
  std::vector<double> probabilities(int h, int i, const std::function<bool(int)>& allowed) const {
    std::vector<double> p(key_end(i), 0.0);
    double max = -INFINITY;
    for (int j = 0; j < key_end(i); ++j) {
      if (!allowed(j)) continue;
      double dot = 0.0;
      for (int d = 0; d < c.dim; ++d)
        dot += static_cast<double>(q.at(h, i - c.query_offset, d)) * k.at(kv(h), j, d);
      p[j] = dot * scale();
      max = std::max(max, p[j]);
    }
    double sum = 0.0;
    for (int j = 0; j < key_end(i); ++j) sum += p[j] = allowed(j) ? std::exp(p[j] - max) : 0.0;
    for (double& x : p) x /= sum;
    return p;
  }
  std::vector<double> reference_row(int h, int i, const std::function<bool(int)>& allowed) const {
    const auto p = probabilities(h, i, allowed);
    std::vector<double> o(c.dim, 0.0);
    for (int j = 0; j < key_end(i); ++j)
      for (int d = 0; d < c.dim; ++d) o[d] += p[j] * v.at(kv(h), j, d);
    return o;
  }
};

inline bool every_key(int) { return true; }

// Mean probability mass of (query tile, key tile) in float64 over each
// tile's rows, or over `samples` evenly spaced rows of each tile (the first
// included; 0: every row), as capture_tile_mass samples them.
inline std::vector<double> reference_mass(const Problem& p, int prefix, int block, int samples = 0) {
  const int tiles = (prefix + block - 1) / block, stride = samples > 0 ? block / samples : 1;
  std::vector<double> mass(static_cast<std::size_t>(p.c.heads) * tiles * tiles, 0.0);
  for (int h = 0; h < p.c.heads; ++h)
    for (int i = 0; i < prefix; ++i) {
      if ((i % block) % stride != 0) continue;
      const auto prob = p.probabilities(h, i, every_key);
      const int tile = i / block, last = std::min((tile + 1) * block, prefix);
      const int rows = (last - tile * block + stride - 1) / stride;
      for (std::size_t j = 0; j < prob.size(); ++j)
        mass[(static_cast<std::size_t>(h) * tiles + tile) * tiles + j / block] += prob[j] / rows;
    }
  return mass;
}

// The largest absolute difference; infinite where the sizes differ.
inline double worst_difference(const std::vector<float>& got, const std::vector<double>& want) {
  double worst = got.size() == want.size() ? 0.0 : INFINITY;
  for (std::size_t i = 0; i < std::min(got.size(), want.size()); ++i)
    worst = std::max(worst, std::abs(got[i] - want[i]));
  return worst;
}

// ||out - ref|| / ||ref|| over the given rows (positions) of every head;
// fails on any non-finite output.
inline double relative_error(const Problem& p, const std::vector<float>& out, const std::vector<int>& rows,
                      const std::function<bool(int, int, int)>& allowed) {
  double err = 0.0, norm = 0.0;
  for (int h = 0; h < p.c.heads; ++h)
    for (int i : rows) {
      const auto ref = p.reference_row(h, i, [&](int j) { return allowed(h, i, j); });
      for (int d = 0; d < p.c.dim; ++d) {
        const float o = out[(static_cast<std::size_t>(h) * p.out.tokens + i - p.c.query_offset) * p.c.dim + d];
        if (!std::isfinite(o)) return INFINITY;
        err += (o - ref[d]) * (o - ref[d]);
        norm += ref[d] * ref[d];
      }
    }
  return std::sqrt(err / norm);
}

inline std::vector<int> all_rows(const Problem& p) {
  std::vector<int> rows(p.out.tokens);
  for (int i = 0; i < p.out.tokens; ++i) rows[i] = p.c.query_offset + i;
  return rows;
}

// The rows a 32k test checks against the float64 reference (all of them
// would take minutes on the host): tile edges, both ends and `random` more.
inline std::vector<int> long_sequence_rows(int random, unsigned seed) {
  std::vector<int> rows{0, 1, 63, 64, 127, 128, 1000, 4095, 16383, 32766, 32767};
  std::mt19937 rng(seed);
  for (int i = 0; i < random; ++i) rows.push_back(static_cast<int>(rng() % 32768));
  std::sort(rows.begin(), rows.end());
  return rows;
}

// bf16 keeps 8 significant bits, fp16 11: the output's own rounding and P's
// rounding before P V bound the error.
inline double tolerance(DType dtype) { return dtype == DType::kBF16 ? 1e-2 : 2e-3; }

// Whether a CUDA device is present (the tests skip without one).
inline bool has_cuda_device() {
  int devices = 0;
  if (cudaGetDeviceCount(&devices) == cudaSuccess && devices > 0) return true;
  cudaGetLastError();
  return false;
}

}  // namespace attention_echo::kernels::cuda::testing
