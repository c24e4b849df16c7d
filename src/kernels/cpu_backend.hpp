// The host backend: runs the tile-loop drivers (attention_kernel.hpp,
// dense_echo.hpp) with the tile loop of the active ISA (core/isa.hpp, chosen
// per call, so AE_ISA and set_active_isa between calls take effect) on a
// thread pool, and rejects views that are not float32 in host memory.
//
// The backend borrows its pool rather than owning one: the pool is the
// process's CPU threads, shared with work that is not attention (the
// engine's GEMM, the public attention(..., pool) signature), and one pool
// per component would oversubscribe the cores. A CpuBackend is therefore two
// words, cheap to make per call; its pool must outlive it.
#pragma once

#include "kernels/backend.hpp"

namespace attention_echo::kernels {

class CpuBackend final : public Backend {
 public:
  explicit CpuBackend(ThreadPool& pool) : pool_(pool) {}

  Device device() const override { return Device::cpu(); }
  void check_problem(const AnyAttentionProblem& problem) const override;
  void exact_rows(const AnyAttentionProblem& problem, int row_begin, int row_end) const override;
  std::unique_ptr<const KeptTiles> exact_rows_with_kept_tiles(const AnyAttentionProblem& problem, int prefix,
                                                              int block, double keep_mass) const override;
  DenseLogits exact_rows_with_dense_logits(const AnyAttentionProblem& problem, int prefix) const override;
  void sparse_rows(const AnyAttentionProblem& problem, int rows, const KeptTiles& kept) const override;
  void dense_echo_rows(const AnyAttentionProblem& problem, int rows, const DenseLogits& cached,
                       float adjustment_strength, bool enable_jacobian) const override;
  double max_row_error(const AnyAttentionProblem& problem, std::span<const int> rows) const override;
  std::unique_ptr<PayloadBuffer> allocate(std::size_t bytes) const override;
  void copy_rows(const AnyHeadsView& src, const MutableAnyHeadsView& dst, int rows) const override;
  std::uint64_t k_fingerprint(const AnyHeadsView& k, int prefix) const override;
  std::shared_ptr<const Fence> fence() const override { return nullptr; }
  void wait(const Fence&) const override {}

  // exact_rows of float32 views, which may be paged K/V (the any-dtype
  // views of the seam carry no pages): public attention() comes here.
  void exact_rows(const AttentionProblem& problem, int row_begin, int row_end) const;

  // Exact rows [0, T) and the tile mass they record (exact_rows_with_kept_tiles
  // selects from it; tests read it).
  TileMass exact_rows_with_tile_mass(const AttentionProblem& problem, int prefix, int block) const;

  // Exact outputs of the given rows (attention_rows, and the guard's
  // reference): result.row(h, r) gets row rows[r] of head h; result is
  // [H, rows.size(), D].
  void selected_rows(const AttentionProblem& problem, std::span<const int> rows, const MutableHeadsView& result) const;

 private:
  // The active ISA's tile loop on this backend's pool, for one call.
  CpuTarget target() const;
  // The problem as the host drivers read it, after check_problem.
  AttentionProblem host(const AnyAttentionProblem& problem) const;

  ThreadPool& pool_;
};

}  // namespace attention_echo::kernels
