// The dense miss on CUDA: cuDNN's fused attention where this build has it,
// it runs the problem (cudnn_attention.hpp) and its graph is worth building,
// our kernel otherwise (cuda_attention.hpp).
//
// A cuDNN graph serves one shape (sequence length included) and building
// one costs 53-66 ms on an H200 (567 ms for the process's first), while
// cuDNN saves about 5 ms over our kernel per causal 16k-token miss of 32
// heads of 128: a shape's graph is built once its misses have done
// kCudnnBuildWork (heads x rows x keys x dim), twelve such misses; until
// then they run on our kernel. So a one-off 4k prompt never waits for a
// build, a 32-layer 16k prompt builds at its 12th layer, and repeated
// shapes move to cuDNN. The environment variable AE_CUDNN=0 forces our
// kernel, AE_CUDNN=1 cuDNN from a shape's first miss (to compare the two).
#pragma once

#include "kernels/cuda/cuda_attention.hpp"
#include "kernels/cuda/tile_mass_capture.hpp"

namespace attention_echo::kernels::cuda {

inline constexpr double kCudnnBuildWork = 12.0 * 32 * 16384.0 * 16384.0 * 128;

// Rows [query_offset, T) of every head, as exact_attention defines them.
void miss_attention(const DeviceProblem& problem, void* stream);

// Rows [0, T) plus the tile mass of the prefix block (as
// exact_attention_with_tile_mass): on cuDNN, the mass is captured by a
// second kernel from `samples` rows per tile (tile_mass_capture.hpp); on our
// kernel it is recorded exactly in the same pass.
DeviceTileMass miss_attention_with_tile_mass(const DeviceProblem& problem, int prefix, int block, void* stream,
                                             int samples = kMassSamples);

}  // namespace attention_echo::kernels::cuda
