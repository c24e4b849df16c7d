// miss_attention.hpp: the route between cuDNN and our kernel.
#include "kernels/cuda/miss_attention.hpp"

#include <cstdlib>
#include <cstring>

#include "kernels/cuda/cudnn_attention.hpp"

namespace attention_echo::kernels::cuda {

bool miss_uses_cudnn() {
  static const bool forced_off = [] {
    const char* value = std::getenv("AE_CUDNN");
    return value != nullptr && std::strcmp(value, "0") == 0;
  }();
  return !forced_off && cudnn_available();
}

void miss_attention(const DeviceProblem& problem, void* stream) {
  if (miss_uses_cudnn() && cudnn_attention(problem, nullptr, stream)) return;
  exact_attention(problem, stream);
}

DeviceTileMass miss_attention_with_tile_mass(const DeviceProblem& problem, int prefix, int block, void* stream,
                                             int samples) {
  check_tile_mass_args(problem, prefix, block, samples);
  if (miss_uses_cudnn()) {
    const DeviceBuffer lse(static_cast<std::size_t>(problem.q.heads) * problem.k.tokens * sizeof(float), stream);
    if (cudnn_attention(problem, static_cast<float*>(lse.data()), stream))
      return capture_tile_mass(problem, static_cast<const float*>(lse.data()), prefix, block, samples, stream);
  }
  return exact_attention_with_tile_mass(problem, prefix, block, stream);
}

}  // namespace attention_echo::kernels::cuda
