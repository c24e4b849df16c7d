// The backend seam: every kernel entry point the library's tiers and the
// public attention() run, behind one interface, so nothing above it cares
// which device holds the memory or which code computes on it. CpuBackend
// (cpu_backend.hpp) is the host implementation (float32 views);
// CudaBackend (cuda/cuda_backend.hpp, builds with AE_CUDA) the device one
// (float16/bfloat16 views, asynchronous on one stream).
//
// Payloads live where their backend computes: a tier allocates its stored
// rows through allocate() and the backend makes its kept tiles
// (exact_rows_with_kept_tiles), so a CUDA cache entry keeps them in device
// memory and the cache's metadata and index stay on the host. Like llama.cpp's backend
// buffers, the tier sees only bytes and views.
//
// Every method checks its own arguments and that every view it reads or
// writes is on device() with a dtype the backend runs (std::invalid_argument
// naming the argument); the problem's shapes are assumed validated
// (validate_attention_inputs). Methods are const and safe to call
// concurrently. A call is one virtual dispatch per entry point, never per
// tile. Rows are bit-identical across entry points and thread counts for one
// backend and ISA. Paged K/V (tensor.hpp) never reaches the seam: the
// any-dtype views have no pages, and public attention() / attention_rows()
// read paged host K/V through the CPU kernels directly.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <span>
#include <string_view>
#include <utility>

#include "attention_echo/tensor.hpp"
#include "kernels/attention_kernel.hpp"
#include "kernels/dense_echo.hpp"

namespace attention_echo::kernels {

// Bytes a backend allocated on its device for a cache payload, freed when
// the owner drops them.
class PayloadBuffer {
 public:
  virtual ~PayloadBuffer() = default;
  virtual void* data() const = 0;
  virtual std::size_t bytes() const = 0;
};

// Host memory: what CpuBackend::allocate returns, and what a snapshot's
// payloads are read into.
class HostBuffer final : public PayloadBuffer {
 public:
  explicit HostBuffer(std::size_t bytes) : data_(new std::byte[bytes]), bytes_(bytes) {}
  void* data() const override { return data_.get(); }
  std::size_t bytes() const override { return bytes_; }

 private:
  std::unique_ptr<std::byte[]> data_;
  std::size_t bytes_;
};

// A kept-tile set as one backend's sparse_rows reads it: the TileSet itself
// (host memory: snapshots and kept fractions read it) plus whatever the
// backend prepared from it (the CUDA backend: a plan in device memory).
class KeptTiles {
 public:
  explicit KeptTiles(TileSet tiles) : tiles_(std::move(tiles)) {}
  virtual ~KeptTiles() = default;
  const TileSet& tiles() const { return tiles_; }
  // Bytes on the backend's device (the TileSet's on the host).
  virtual std::size_t bytes() const {
    return tiles_.offsets.size() * sizeof(std::uint32_t) + tiles_.cols.size() * sizeof(std::uint16_t);
  }

 private:
  TileSet tiles_;
};

// The point in a backend's queue up to which a call's writes are done: a
// later call, maybe on another stream, waits for it before it reads them.
// Host backends finish before they return and make none.
class Fence {
 public:
  virtual ~Fence() = default;
};

class Backend {
 public:
  virtual ~Backend() = default;

  // Where the views this backend reads and writes must live.
  virtual Device device() const = 0;

  // Throw std::invalid_argument naming the view unless it is on device().
  void require_device(std::string_view name, Device where) const;
  // Throw std::invalid_argument naming the argument unless this backend runs
  // the problem: views on device(), a dtype and head dim it supports, the
  // layout its kernels load. What every method below checks; the cache calls
  // it first, so a call it refuses changes no state.
  virtual void check_problem(const AnyAttentionProblem& problem) const = 0;

  // Exact rows [row_begin, row_end) of every head into problem.out; rows are
  // sequence positions, so [query_offset, T) is all of them.
  virtual void exact_rows(const AnyAttentionProblem& problem, int row_begin, int row_end) const = 0;

  // A sparse-mode miss in one pass: exact rows [0, T), and the key tiles
  // select_tiles keeps (keep_mass of each query tile's attention mass) of the
  // prefix block [0, prefix) in tiles of `block` tokens (a positive multiple
  // of 32; of 64 on CUDA), in the form this backend's sparse_rows reads.
  // Recording the mass does not change a bit of the output.
  virtual std::unique_ptr<const KeptTiles> exact_rows_with_kept_tiles(const AnyAttentionProblem& problem, int prefix,
                                                                      int block, double keep_mass) const = 0;

  // A dense-mode miss in one pass: exact rows [0, T) and the prefix block's
  // logits and mean query (see dense_echo.hpp). Host only.
  virtual DenseLogits exact_rows_with_dense_logits(const AnyAttentionProblem& problem, int prefix) const = 0;

  // Sparse echo: prefix rows [0, rows) over their kept key tiles only
  // (kept from exact_rows_with_kept_tiles of this backend's kind, or, on the
  // host, any KeptTiles).
  virtual void sparse_rows(const AnyAttentionProblem& problem, int rows, const KeptTiles& kept) const = 0;

  // Dense echo: prefix rows [0, rows) from cached logits plus the Taylor step.
  // Host only.
  virtual void dense_echo_rows(const AnyAttentionProblem& problem, int rows, const DenseLogits& cached,
                               float adjustment_strength, bool enable_jacobian) const = 0;

  // The verification guard's measure: over the given rows (ascending prefix
  // positions) of problem.out, the maximum over heads of
  // ||out - exact|| / ||exact|| (or ||out - exact|| where exact is 0), the
  // exact rows computed here in float32 and not written anywhere. Returns
  // once the value is known (the CUDA backend waits for its stream).
  virtual double max_row_error(const AnyAttentionProblem& problem, std::span<const int> rows) const = 0;

  // `bytes` of this backend's device memory for a payload.
  virtual std::unique_ptr<PayloadBuffer> allocate(std::size_t bytes) const = 0;

  // Rows [0, rows) of every head from src to dst, any strides, one dtype:
  // the exact tier's copy of prefix output rows into and out of its stored
  // payload.
  virtual void copy_rows(const AnyHeadsView& src, const MutableAnyHeadsView& dst, int rows) const = 0;

  // A cheap hash of k's rows [0, prefix) of every kv head: any change to
  // them changes it (with overwhelming probability), so the exact tier treats
  // same tokens with other weights as a miss. The same value for the same
  // bytes on one backend kind (entries never cross devices or dtypes).
  virtual std::uint64_t k_fingerprint(const AnyHeadsView& k, int prefix) const = 0;

  // A fence after the work queued so far (null where calls are synchronous),
  // and making later work wait for one.
  virtual std::shared_ptr<const Fence> fence() const = 0;
  virtual void wait(const Fence& fence) const = 0;
};

}  // namespace attention_echo::kernels
