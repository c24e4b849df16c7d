// The dense miss on CUDA: cuDNN's fused attention where this build has it,
// it runs the problem (cudnn_attention.hpp) and its graph is worth building,
// our kernels otherwise: the sparse kernel walking every causal chunk
// (dense_causal_attention) for causal problems, our FA2 kernel for the
// bidirectional prefix (cuda_attention.hpp).
//
// A cuDNN graph serves one shape (sequence length included) and building
// one costs 53-66 ms on an H200 (567 ms for the process's first), while
// cuDNN saves 5-14% of a miss over the dense walk (0.19 ms per causal
// 16k-token miss of 32 heads of 128, 0.86 ms at 32k; BENCHMARKS.md section
// 6): a shape's graph is built once its misses have done kCudnnBuildWork
// (heads x rows x keys x dim), three hundred such 16k misses; until then
// they run on our kernels. So prompts of one-off lengths never wait for a
// build, and a shape served that often moves to cuDNN. (Against our FA2
// kernel, 2.3x cuDNN's time, it was twelve.) The environment variable
// AE_CUDNN=0 forces our kernels, AE_CUDNN=1 cuDNN from a shape's first miss
// (to compare them).
#pragma once

#include "kernels/cuda/cuda_attention.hpp"
#include "kernels/cuda/tile_mass_capture.hpp"

namespace attention_echo::kernels::cuda {

inline constexpr double kCudnnBuildWork = 300.0 * 32 * 16384.0 * 16384.0 * 128;

// Rows [query_offset, T) of every head, as exact_attention defines them.
void miss_attention(const DeviceProblem& problem, void* stream);

// Rows [0, T) plus the tile mass of the prefix block (as
// exact_attention_with_tile_mass): after cuDNN, which gives each row's
// log-sum-exp, the mass is captured by a second kernel from `samples` rows
// per tile (tile_mass_capture.hpp); the dense walk and our FA2 kernel record
// it exactly in the same pass.
DeviceTileMass miss_attention_with_tile_mass(const DeviceProblem& problem, int prefix, int block, void* stream,
                                             int samples = kMassSamples);

}  // namespace attention_echo::kernels::cuda
