// The backend seam: every kernel entry point the library's tiers and the
// public attention() run, behind one interface, so nothing above it cares
// which device holds the memory or which code computes on it. CpuBackend
// (cpu_backend.hpp) is the host implementation.
//
// Every method checks its own arguments and that every view it reads or
// writes is on device() (std::invalid_argument naming the argument); the
// problem's shapes are assumed validated (validate_attention_inputs).
// Key and value views may be paged (tensor.hpp): a backend reads them or
// rejects them (std::invalid_argument naming the view); CpuBackend reads
// them in place. Methods are const and safe to call concurrently. A call is one virtual
// dispatch per entry point, never per tile. Rows are bit-identical across
// entry points and thread counts for one backend and ISA.
#pragma once

#include <cstdint>
#include <span>
#include <string_view>

#include "attention_echo/tensor.hpp"
#include "kernels/attention_kernel.hpp"
#include "kernels/dense_echo.hpp"

namespace attention_echo::kernels {

class Backend {
 public:
  virtual ~Backend() = default;

  // Where the views this backend reads and writes must live.
  virtual Device device() const = 0;

  // Throw std::invalid_argument naming the view unless it is on device():
  // the check every method makes, for callers that must refuse a call before
  // they change any state of their own.
  void require_device(std::string_view name, Device where) const;
  void require_device(const AttentionProblem& problem) const;  // query, key, value, out

  // Exact rows [row_begin, row_end) of every head into problem.out; rows are
  // sequence positions, so [query_offset, T) is all of them.
  virtual void exact_rows(const AttentionProblem& problem, int row_begin, int row_end) const = 0;

  // A sparse-mode miss in one pass: exact rows [0, T), plus the mean
  // attention mass of every (query tile, key tile) of the prefix block
  // [0, prefix) in tiles of `block` tokens (a positive multiple of 32).
  // Recording does not change a bit of the output.
  virtual TileMass exact_rows_with_tile_mass(const AttentionProblem& problem, int prefix, int block) const = 0;

  // A dense-mode miss in one pass: exact rows [0, T) and the prefix block's
  // logits and mean query (see dense_echo.hpp).
  virtual DenseLogits exact_rows_with_dense_logits(const AttentionProblem& problem, int prefix) const = 0;

  // Sparse echo: prefix rows [0, rows) over their kept key tiles only.
  virtual void sparse_rows(const AttentionProblem& problem, int rows, const TileSet& kept) const = 0;

  // Dense echo: prefix rows [0, rows) from cached logits plus the Taylor step.
  virtual void dense_echo_rows(const AttentionProblem& problem, int rows, const DenseLogits& cached,
                               float adjustment_strength, bool enable_jacobian) const = 0;

  // The guard's exact rows: result.row(h, r) gets row rows[r] of head h;
  // result is [H, rows.size(), D].
  virtual void selected_rows(const AttentionProblem& problem, std::span<const int> rows,
                             const MutableHeadsView& result) const = 0;

  // Rows [0, rows) of every head from src to dst, any strides: the exact
  // tier's copy of prefix output rows into and out of its stored payload.
  virtual void copy_rows(const HeadsView& src, const MutableHeadsView& dst, int rows) const = 0;

  // A cheap hash of k's rows [0, prefix) of every kv head: any change to
  // them changes it (with overwhelming probability), so the exact tier treats
  // same tokens with other weights as a miss. The same value on every
  // backend for the same bytes.
  virtual std::uint64_t k_fingerprint(const HeadsView& k, int prefix) const = 0;
};

}  // namespace attention_echo::kernels
