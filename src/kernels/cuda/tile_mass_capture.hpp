// The tile mass of a miss whose attention ran on cuDNN (which records no
// mass; our kernels record it exactly in the same pass), from the rows'
// log-sum-exp: mass(I, J) is the mean over query tile
// I's rows of sum over J's keys the row sees of exp(scale q.k - lse). One
// pass of Q K^T over every row costs more than cuDNN's whole miss (1.3-1.5x
// on an H200), so by default only kMassSamples rows of every tile (evenly
// spaced, the tile's first included) are recomputed and their mean is the
// estimate. samples == block gives the exact mass. BENCHMARKS.md section 6
// has the cost (8 of 128 rows after cuDNN's miss: +14% at T = 4k-8k, where
// the capture is latency-bound, +10% at 16k, +6% at 32k) and what the
// estimate changes in the kept-tile selection; the sparse tier's guard
// measures the error of every hit anyway.
#pragma once

#include "kernels/cuda/cuda_attention.hpp"

namespace attention_echo::kernels::cuda {

// Sampled rows per tile of the miss's capture: 8 of 128 cost 0.5x what 16
// did at T = 32k (1.43 against 2.90 ms, H200) and kept the same tiles on
// peaked inputs (bench_cuda.py's selection rows). The cache's 64-token tiles
// take 8 too: 4 of 64 would cut the capture from +21-32% of cuDNN's miss to
// +6-19%, but on the bundled model's q/k the tiles it keeps at sparse_mass
// 0.98 held up to 8 points less of the worst tile row's exact mass (0.82-0.97
// against 0.88-0.97; model_selection.py, BENCHMARKS.md section 6).
inline constexpr int kMassSamples = 8;

// Throws std::invalid_argument naming the argument unless capture_tile_mass
// takes these: query_offset 0, prefix in [0, T] (non-causal: the problem's
// prefix_length), block a positive multiple of 64, samples 4, 8 or a multiple
// of 16 that divides block.
void check_tile_mass_args(const DeviceProblem& problem, int prefix, int block, int samples);

// The tile mass of the prefix block [0, prefix) in tiles of `block` tokens,
// from row_lse (device memory, [H, T] floats, natural log, as
// cudnn_attention writes it). Reads q and k only.
DeviceTileMass capture_tile_mass(const DeviceProblem& problem, const float* row_lse, int prefix, int block,
                                 int samples, void* stream);

}  // namespace attention_echo::kernels::cuda
