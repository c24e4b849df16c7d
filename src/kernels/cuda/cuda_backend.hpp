// The CUDA backend (builds with AE_CUDA): the backend seam over the kernels
// of cuda_attention.hpp, for float16/bfloat16 views in the memory of one
// device, every call queued on one stream (the caller's). Its payloads are
// device memory; its fences are CUDA events. Host-only work (dense echo)
// is refused with std::invalid_argument.
//
// Like CpuBackend it is cheap to make per call: a device index and a stream.
// This header needs no CUDA headers (streams are void*, a cudaStream_t).
#pragma once

#include <memory>

#include "kernels/backend.hpp"

namespace attention_echo::kernels::cuda {

std::unique_ptr<Backend> make_backend(int device, void* stream);

}  // namespace attention_echo::kernels::cuda
