// The dense miss on CUDA: cuDNN's fused attention where this build has it
// and it runs the problem (cudnn_attention.hpp), our kernel otherwise
// (cuda_attention.hpp). The environment variable AE_CUDNN=0 forces our
// kernel (to compare the two, or to rule cuDNN out).
#pragma once

#include "kernels/cuda/cuda_attention.hpp"
#include "kernels/cuda/tile_mass_capture.hpp"

namespace attention_echo::kernels::cuda {

// Whether the misses of this process run on cuDNN where it takes the problem.
bool miss_uses_cudnn();

// Rows [query_offset, T) of every head, as exact_attention defines them.
void miss_attention(const DeviceProblem& problem, void* stream);

// Rows [0, T) plus the tile mass of the prefix block (as
// exact_attention_with_tile_mass): on cuDNN, the mass is captured by a
// second kernel from `samples` rows per tile (tile_mass_capture.hpp); on our
// kernel it is recorded exactly in the same pass.
DeviceTileMass miss_attention_with_tile_mass(const DeviceProblem& problem, int prefix, int block, void* stream,
                                             int samples = kMassSamples);

}  // namespace attention_echo::kernels::cuda
