// cuDNN's fused attention (cudnn-frontend's SDPA graph, fp32 accumulation)
// for the dense miss: on an H200 it runs the causal bf16 miss 2.2-2.4x faster
// than our mma.sync kernel (BENCHMARKS.md section 6). Built with AE_CUDNN
// (CMake finds cuDNN 9 and cudnn-frontend); without it, or where cuDNN
// cannot run a problem, these calls return false and queue nothing, and the
// caller runs our kernel (miss_attention.hpp routes).
//
// The semantics are cuda_attention.hpp's: rows [query_offset, T), causal
// rows see keys j <= i (cuDNN's causal mask aligned bottom-right: q row r of
// T - query_offset sees keys <= r + query_offset), non-causal rows i <
// prefix_length see the prefix keys only and the others every key (two
// non-causal cuDNN calls on the two row ranges: no mask cuDNN has expresses
// the prefix block, and the ranges need no merging since each row sees one
// key range). Output bits differ from our kernel's (another summation order).
//
// Built graphs are cached per thread and shape (dtype, heads, rows, keys,
// dim, strides, mask, scale): building one costs milliseconds.
#pragma once

#include "kernels/cuda/cuda_attention.hpp"

namespace attention_echo::kernels::cuda {

// Whether this build has cuDNN and the library loads on this device; the
// version it runs with (cudnnGetVersion), 0 without.
bool cudnn_available();
int cudnn_version();

// Rows [query_offset, T) of every head into problem.out on cuDNN; row_lse
// (device memory, may be null) gets row r's log-sum-exp over its keys of
// scale * q.k (natural log) at [head * (T - query_offset) + r]. False, with
// nothing queued, where cuDNN cannot run the problem.
bool cudnn_attention(const DeviceProblem& problem, float* row_lse, void* stream);

// Whether this thread has cuDNN's graphs for `problem` (with the row
// log-sum-exp or without), or the misses of its shape asked here so far,
// this one included, have done `build_work` (heads x rows x keys x dim) in
// all: what building them is worth (miss_attention.hpp's policy). A graph
// belongs to one sequence length, and a serving process sees a new one on
// most prompts.
bool cudnn_graphs_earned(const DeviceProblem& problem, bool row_lse, double build_work);

}  // namespace attention_echo::kernels::cuda
