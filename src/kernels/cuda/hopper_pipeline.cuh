// Hopper's asynchronous loads and the barriers that hand them between warps
// (sm_90): the bulk tensor copy engine (TMA) writing a tile of a tensor map
// into shared memory and counting its bytes on an mbarrier, the mbarrier's
// arrive / wait, and setmaxnreg (sm_90a), which moves registers from the
// warpgroup that only issues loads to the ones that compute.
//
// The producer / consumer ring these make (sparse_hopper.cuh): stage s has a
// "full" barrier (the producer's expect_tx plus the copy's bytes complete it)
// and an "empty" one (every consumer warp arrives once it has read the
// stage); the k-th use of a barrier completes its phase k, and a wait names
// the phase's parity, k & 1.
#pragma once

#include <cuda.h>

#include <cstdint>

namespace attention_echo::kernels::cuda::detail {

__device__ __forceinline__ void mbarrier_init(unsigned bar, unsigned count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(bar), "r"(count));
}
// Makes the initialised barriers visible to the copy engine and the other threads (before a __syncthreads).
__device__ __forceinline__ void mbarrier_init_fence() { asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory"); }

// The producer's arrival, announcing `bytes` that copies will complete.
__device__ __forceinline__ void mbarrier_expect_bytes(unsigned bar, unsigned bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(bar), "r"(bytes) : "memory");
}
__device__ __forceinline__ void mbarrier_arrive(unsigned bar) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(bar) : "memory");
}
__device__ __forceinline__ void mbarrier_wait(unsigned bar, unsigned parity) {
  asm volatile(
      "{\n.reg .pred done;\nWAIT:\n"
      "mbarrier.try_wait.parity.shared::cta.b64 done, [%0], %1;\n"
      "@!done bra WAIT;\n}\n" ::"r"(bar),
      "r"(parity)
      : "memory");
}

// The box at (x, y, z) of a 3-d tensor map (x innermost) into shared memory
// at dst, its bytes counted on bar. Out-of-range elements arrive as zeros.
__device__ __forceinline__ void tma_load_3d(unsigned dst, const CUtensorMap& map, int x, int y, int z, unsigned bar) {
  asm volatile(
      "cp.async.bulk.tensor.3d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3, %4}], [%5];\n" ::
          "r"(dst),
      "l"(reinterpret_cast<std::uint64_t>(&map)), "r"(x), "r"(y), "r"(z), "r"(bar)
      : "memory");
}

// Every warp of a warpgroup executes the same one.
template <int kRegisters>
__device__ __forceinline__ void release_registers() {
  asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(kRegisters));
}
template <int kRegisters>
__device__ __forceinline__ void claim_registers() {
  asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(kRegisters));
}

}  // namespace attention_echo::kernels::cuda::detail
