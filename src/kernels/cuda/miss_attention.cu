// miss_attention.hpp: the route between cuDNN and our kernel.
#include "kernels/cuda/miss_attention.hpp"

#include <cstdlib>
#include <cstring>

#include "kernels/cuda/cudnn_attention.hpp"

namespace attention_echo::kernels::cuda {

namespace {

enum class CudnnUse { kNever, kEarned, kAlways };

CudnnUse cudnn_use() {
  static const CudnnUse use = [] {
    const char* value = std::getenv("AE_CUDNN");
    if ((value != nullptr && std::strcmp(value, "0") == 0) || !cudnn_available()) return CudnnUse::kNever;
    return value != nullptr && std::strcmp(value, "1") == 0 ? CudnnUse::kAlways : CudnnUse::kEarned;
  }();
  return use;
}

// Whether this miss goes to cuDNN (which may still refuse the problem).
bool cudnn_takes(const DeviceProblem& problem, bool row_lse) {
  switch (cudnn_use()) {
    case CudnnUse::kNever: return false;
    case CudnnUse::kEarned: return cudnn_graphs_earned(problem, row_lse, kCudnnBuildWork);
    case CudnnUse::kAlways: return true;
  }
  return false;
}

// What cuDNN does not take: the sparse kernel's dense causal walk where it
// runs the problem (half our FA2 kernel's time), else that kernel.
bool dense_walk_takes(const DeviceProblem& problem) { return problem.causal; }

}  // namespace

void miss_attention(const DeviceProblem& problem, void* stream) {
  if (cudnn_takes(problem, false) && cudnn_attention(problem, nullptr, stream)) return;
  if (dense_walk_takes(problem)) return dense_causal_attention(problem, nullptr, stream);
  exact_attention(problem, stream);
}

DeviceTileMass miss_attention_with_tile_mass(const DeviceProblem& problem, int prefix, int block, void* stream,
                                             int samples) {
  check_tile_mass_args(problem, prefix, block, samples);
  if (cudnn_takes(problem, true)) {
    const DeviceBuffer lse(static_cast<std::size_t>(problem.q.heads) * problem.k.tokens * sizeof(float), stream);
    const auto row_lse = static_cast<float*>(lse.data());
    if (cudnn_attention(problem, row_lse, stream))
      return capture_tile_mass(problem, row_lse, prefix, block, samples, stream);
  }
  if (dense_walk_takes(problem)) return dense_causal_attention_with_tile_mass(problem, prefix, block, stream);
  return exact_attention_with_tile_mass(problem, prefix, block, stream);
}

}  // namespace attention_echo::kernels::cuda
