// CudaBackend: the backend seam (backend.hpp) over the CUDA kernels, on one
// device and the caller's stream.
#include "kernels/cuda/cuda_backend.hpp"

#include <cuda_runtime.h>

#include <stdexcept>
#include <string>
#include <utility>

#include "core/errors.hpp"
#include "kernels/cuda/cuda_attention.hpp"
#include "kernels/cuda/miss_attention.hpp"

namespace attention_echo::kernels::cuda {
namespace {

void check_cuda(cudaError_t status, const char* what) {
  if (status != cudaSuccess) throw std::runtime_error(std::string(what) + ": " + cudaGetErrorString(status));
}

// Makes `device` current for one backend call and restores the caller's
// device after it: the kernels run on the current device, and a library call
// should not change the thread's.
class DeviceScope {
 public:
  explicit DeviceScope(int device) {
    check_cuda(cudaGetDevice(&previous_), "cudaGetDevice");
    if (previous_ != device) check_cuda(cudaSetDevice(device), "cudaSetDevice");
  }
  ~DeviceScope() { cudaSetDevice(previous_); }
  DeviceScope(const DeviceScope&) = delete;
  DeviceScope& operator=(const DeviceScope&) = delete;

 private:
  int previous_ = 0;
};

class DeviceMemory final : public PayloadBuffer {
 public:
  explicit DeviceMemory(std::size_t bytes) : buffer_(bytes) {}
  void* data() const override { return buffer_.data(); }
  std::size_t bytes() const override { return buffer_.bytes(); }

 private:
  DeviceBuffer buffer_;  // outlives the stream that made it (cudaMalloc / cudaFree)
};

class DeviceKeptTiles final : public KeptTiles {
 public:
  DeviceKeptTiles(TileSet tiles, void* stream)
      : KeptTiles(std::move(tiles)), plan_(this->tiles(), this->tiles().tiles * this->tiles().block, stream) {}
  const DeviceTilePlan& plan() const { return plan_; }
  std::size_t bytes() const override { return plan_.bytes(); }

 private:
  DeviceTilePlan plan_;
};

class EventFence final : public Fence {
 public:
  explicit EventFence(void* stream) {
    check_cuda(cudaEventCreateWithFlags(&event_, cudaEventDisableTiming), "cudaEventCreate");
    check_cuda(cudaEventRecord(event_, static_cast<cudaStream_t>(stream)), "cudaEventRecord");
  }
  ~EventFence() override { cudaEventDestroy(event_); }
  EventFence(const EventFence&) = delete;
  EventFence& operator=(const EventFence&) = delete;
  cudaEvent_t event() const { return event_; }

 private:
  cudaEvent_t event_ = nullptr;
};

class CudaBackend final : public Backend {
 public:
  CudaBackend(int device, void* stream) : device_(device), stream_(stream) {}

  Device device() const override { return Device::cuda(device_); }

  void check_problem(const AnyAttentionProblem& problem) const override {
    require_devices(problem);
    int devices = 0;
    if (cudaGetDeviceCount(&devices) != cudaSuccess || device_ < 0 || device_ >= devices) {
      cudaGetLastError();  // no device at all leaves a sticky error
      throw_invalid("query", "is on " + to_string(device()) + ", which this machine does not have");
    }
    const DeviceScope scope(device_);
    cuda::check_problem(device_problem(problem));
  }

  // Rows [row_begin, T) are the problem whose q and out start at row_begin
  // (the kernel's query_offset).
  void exact_rows(const AnyAttentionProblem& problem, int row_begin, int row_end) const override {
    require_devices(problem);
    if (row_begin < problem.query_offset || row_begin > row_end || row_end != problem.rows_end())
      throw_invalid("row_begin", "rows must be [row_begin, T) with row_begin >= query_offset on CUDA");
    // No rows (a hit that served them all): q and out past their last row
    // need not point into an allocation any more, so nothing is checked.
    if (row_begin == row_end) return;
    const DeviceScope scope(device_);
    DeviceProblem p = device_problem(problem);
    const int skip = row_begin - problem.query_offset;
    const std::size_t element = dtype_size(problem.q.dtype);
    p.q.data = static_cast<const char*>(p.q.data) + skip * p.q.token_stride * element;
    p.out.data = static_cast<char*>(p.out.data) + skip * p.out.token_stride * element;
    p.q.tokens -= skip;
    p.out.tokens -= skip;
    p.query_offset = row_begin;
    miss_attention(p, stream_);
  }

  // The tile mass stays on the device: the selection runs there and only
  // the kept set (a bit per tile) comes back to build the plan from.
  std::unique_ptr<const KeptTiles> exact_rows_with_kept_tiles(const AnyAttentionProblem& problem, int prefix,
                                                              int block, double keep_mass) const override {
    require_devices(problem);
    const DeviceScope scope(device_);
    const DeviceTileMass mass = miss_attention_with_tile_mass(device_problem(problem), prefix, block, stream_);
    return std::make_unique<DeviceKeptTiles>(select_tiles(mass, keep_mass, stream_), stream_);
  }

  DenseLogits exact_rows_with_dense_logits(const AnyAttentionProblem&, int) const override { host_only(); }

  void sparse_rows(const AnyAttentionProblem& problem, int rows, const KeptTiles& kept) const override {
    require_devices(problem);
    const auto* device_kept = dynamic_cast<const DeviceKeptTiles*>(&kept);
    if (device_kept == nullptr) throw_invalid("kept", "was not prepared by the CUDA backend");
    const DeviceScope scope(device_);
    sparse_attention(device_problem(problem), device_kept->plan(), stream_, rows);
  }

  void dense_echo_rows(const AnyAttentionProblem&, int, const DenseLogits&, float, bool) const override {
    host_only();
  }

  double max_row_error(const AnyAttentionProblem& problem, std::span<const int> rows) const override {
    require_devices(problem);
    const DeviceScope scope(device_);
    return cuda::max_row_error(device_problem(problem), rows, stream_);
  }

  std::unique_ptr<PayloadBuffer> allocate(std::size_t bytes) const override {
    const DeviceScope scope(device_);
    return std::make_unique<DeviceMemory>(bytes);
  }

  void copy_rows(const AnyHeadsView& src, const MutableAnyHeadsView& dst, int rows) const override {
    require_device("src", src.device);
    require_device("dst", dst.device);
    const DeviceScope scope(device_);
    cuda::copy_rows(src, dst, rows, stream_);
  }

  std::uint64_t k_fingerprint(const AnyHeadsView& k, int prefix) const override {
    require_device("key", k.device);
    const DeviceScope scope(device_);
    return cuda::k_fingerprint(k, prefix, stream_);
  }

  std::shared_ptr<const Fence> fence() const override {
    const DeviceScope scope(device_);
    return std::make_shared<EventFence>(stream_);
  }

  void wait(const Fence& fence) const override {
    const DeviceScope scope(device_);
    check_cuda(cudaStreamWaitEvent(static_cast<cudaStream_t>(stream_), dynamic_cast<const EventFence&>(fence).event()),
               "cudaStreamWaitEvent");
  }

 private:
  void require_devices(const AnyAttentionProblem& problem) const {
    require_device("query", problem.q.device);
    require_device("key", problem.k.device);
    require_device("value", problem.v.device);
    require_device("out", problem.out.device);
  }

  static DeviceProblem device_problem(const AnyAttentionProblem& p) {
    return {p.q, p.k, p.v, p.out, p.scale, p.causal, p.prefix_length, p.query_offset};
  }

  [[noreturn]] static void host_only() { throw_invalid("mode", "dense echo runs on the host only"); }

  int device_;
  void* stream_;
};

}  // namespace

std::unique_ptr<Backend> make_backend(int device, void* stream) {
  return std::make_unique<CudaBackend>(device, stream);
}

}  // namespace attention_echo::kernels::cuda
