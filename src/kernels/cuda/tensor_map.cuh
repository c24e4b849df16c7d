// Tensor maps (the bulk tensor copy engine's descriptors) over the library's
// per-head views, on the host. A view [heads, tokens, dim] becomes a 3-d map
// (dim innermost, then tokens, then heads) whose box is 64 elements of dim
// (128 bytes, the span of the 128-byte swizzle wgmma reads) by `box_rows`
// tokens of one head: the copy writes the [rows][64] half-tiles of
// sparse_hopper.cuh's layout, swizzled, and zero-fills tokens at or past
// `tokens`.
//
// The encoder is a driver function; it is looked up through the runtime
// (cudaGetDriverEntryPointByVersion), so the library links no libcuda.
#pragma once

#include <cuda.h>
#include <cuda_runtime.h>

#include <stdexcept>
#include <string>

#include "kernels/cuda/cuda_attention.hpp"

namespace attention_echo::kernels::cuda::detail {

using EncodeTiled = CUresult (*)(CUtensorMap*, CUtensorMapDataType, cuuint32_t, void*, const cuuint64_t*,
                                 const cuuint64_t*, const cuuint32_t*, const cuuint32_t*, CUtensorMapInterleave,
                                 CUtensorMapSwizzle, CUtensorMapL2promotion, CUtensorMapFloatOOBfill);

inline EncodeTiled encode_tiled() {
  static const EncodeTiled encode = [] {
    void* fn = nullptr;
    cudaDriverEntryPointQueryResult found{};
    if (cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &fn, 12000, cudaEnableDefault, &found) !=
            cudaSuccess ||
        found != cudaDriverEntryPointSuccess)
      throw std::runtime_error("cuTensorMapEncodeTiled: not found in the CUDA driver");
    return reinterpret_cast<EncodeTiled>(fn);
  }();
  return encode;
}

// Tokens [0, tokens) of the view (tokens <= view.tokens), in boxes of box_rows.
inline CUtensorMap tile_map(const DeviceHeads& view, int tokens, int box_rows) {
  constexpr cuuint64_t kElement = 2;  // fp16 / bf16
  const cuuint64_t dims[3] = {static_cast<cuuint64_t>(view.dim), static_cast<cuuint64_t>(tokens),
                              static_cast<cuuint64_t>(view.heads)};
  // A single head's stride is never stepped: any valid value will do.
  const cuuint64_t head_stride = view.heads > 1 ? view.head_stride * kElement : 16;
  const cuuint64_t strides[2] = {view.token_stride * kElement, head_stride};
  const cuuint32_t box[3] = {64, static_cast<cuuint32_t>(box_rows), 1};
  const cuuint32_t steps[3] = {1, 1, 1};
  CUtensorMap map;
  const CUresult status = encode_tiled()(
      &map, view.dtype == DType::kBF16 ? CU_TENSOR_MAP_DATA_TYPE_BFLOAT16 : CU_TENSOR_MAP_DATA_TYPE_FLOAT16, 3,
      const_cast<void*>(view.data), dims, strides, box, steps, CU_TENSOR_MAP_INTERLEAVE_NONE,
      CU_TENSOR_MAP_SWIZZLE_128B, CU_TENSOR_MAP_L2_PROMOTION_L2_128B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  if (status != CUDA_SUCCESS)
    throw std::runtime_error("cuTensorMapEncodeTiled failed (" + std::to_string(static_cast<int>(status)) + ")");
  return map;
}

}  // namespace attention_echo::kernels::cuda::detail
