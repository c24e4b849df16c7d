// The tile mass of a miss whose attention ran elsewhere (cuDNN records no
// mass), from the rows' log-sum-exp: mass(I, J) is the mean over query tile
// I's rows of sum over J's keys the row sees of exp(scale q.k - lse). One
// pass of Q K^T over the causal tiles costs about half the attention, so by
// default only `samples` rows of every tile (evenly spaced, the tile's first
// row included) are recomputed: 16 of 128 is an eighth of the rows and an
// estimate, whose selection error BENCHMARKS.md section 6 measures (the
// sparse tier's guard measures the error of every hit anyway). samples ==
// block gives the exact mass.
#pragma once

#include "kernels/cuda/cuda_attention.hpp"

namespace attention_echo::kernels::cuda {

// Sampled rows per tile of the miss's capture.
inline constexpr int kMassSamples = 16;

// Throws std::invalid_argument naming the argument unless capture_tile_mass
// takes these: query_offset 0, prefix in [0, T] (non-causal: the problem's
// prefix_length), block a positive multiple of 64, samples 8 or a multiple
// of 16 that divides block.
void check_tile_mass_args(const DeviceProblem& problem, int prefix, int block, int samples);

// The tile mass of the prefix block [0, prefix) in tiles of `block` tokens,
// from row_lse (device memory, [H, T] floats, natural log, as
// cudnn_attention writes it). Reads q and k only.
DeviceTileMass capture_tile_mass(const DeviceProblem& problem, const float* row_lse, int prefix, int block,
                                 int samples, void* stream);

}  // namespace attention_echo::kernels::cuda
