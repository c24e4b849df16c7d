// Similarity of unit vectors: the dot product (cosine similarity). The SIMD
// kernels for each ISA live behind dot_kernels(), the index's counterpart of
// hnswlib's space (space_ip.h): an index fetches them once per operation.
#pragma once

#include <cstddef>

namespace attention_echo::index {

// a . b over dim floats.
using DotFn = float (*)(const float* a, const float* b, int dim);
// out[r] = query . rows[r] for count rows of dim floats, row-major.
using DotRowsFn = void (*)(const float* query, const float* rows, std::size_t count, int dim,
                           float* out);

struct DotKernels {
  DotFn dot;
  DotRowsFn dot_rows;
};

// The kernels of active_isa() (AVX-512, AVX2+FMA or scalar). Looked up per
// call, so AE_ISA and set_active_isa() reach the index like the attention
// kernels; an operation keeps the ones it fetched to its end.
DotKernels dot_kernels();

}  // namespace attention_echo::index
