// Non-owning views of the tensors the library reads and writes, each saying
// which device its memory is on. A backend reads only views on its own device
// and rejects others (std::invalid_argument naming the argument).
#pragma once

#include <compare>
#include <cstddef>
#include <string>
#include <type_traits>

namespace attention_echo {

enum class DeviceKind { kCpu, kCuda };

// Where a view's memory lives: host memory, or CUDA device `index`.
struct Device {
  DeviceKind kind = DeviceKind::kCpu;
  int index = 0;

  static constexpr Device cpu() { return {}; }
  static constexpr Device cuda(int index) { return {DeviceKind::kCuda, index}; }
  auto operator<=>(const Device&) const = default;
};

// "cpu" or "cuda:N".
inline std::string to_string(const Device& device) {
  return device.kind == DeviceKind::kCpu ? "cpu" : "cuda:" + std::to_string(device.index);
}

// Keys per step of the CPU attention kernel: it walks keys in chunks that
// never cross a multiple of kKeyChunk, so K/V kept in pages of a multiple of
// kKeyChunk tokens hand every step one page, read in place.
inline constexpr int kKeyChunk = 64;

// Element type of a view: float32 on the host; float16 or bfloat16 (the
// CUDA kernels' inputs, fp32 accumulation) in CUDA device memory.
enum class DType { kF32, kF16, kBF16 };

inline std::size_t dtype_size(DType dtype) { return dtype == DType::kF32 ? 4 : 2; }
inline std::string to_string(DType dtype) {
  return dtype == DType::kF32 ? "float32" : dtype == DType::kF16 ? "float16" : "bfloat16";
}

// Per-head token rows of any dtype: the layout of BasicHeadsView (below) with
// the element type a runtime value, so one signature takes host float32 and
// device float16/bfloat16 alike. Strides are in elements of dtype.
template <typename Void>  // const void or void
struct BasicAnyHeadsView {
  Void* data = nullptr;
  DType dtype = DType::kF32;
  int heads = 0;
  int tokens = 0;
  int dim = 0;
  std::ptrdiff_t head_stride = 0;
  std::ptrdiff_t token_stride = 0;
  Device device{};

  // [heads, tokens, dim], row-major.
  static BasicAnyHeadsView contiguous(Void* data, DType dtype, int heads, int tokens, int dim, Device device) {
    return {data, dtype, heads, tokens, dim, static_cast<std::ptrdiff_t>(tokens) * dim, dim, device};
  }
};

using AnyHeadsView = BasicAnyHeadsView<const void>;
using MutableAnyHeadsView = BasicAnyHeadsView<void>;

// Per-head token rows: element (h, t, d) lives at
// data[h * head_stride + t * token_stride + d]. The innermost (D) stride is
// always 1; the other two let callers pass [H, T, D] or [T, H, D] buffers
// without a copy.
//
// Paged (pages non-null, data null): token t lives in page t / page_tokens,
// element (h, t, d) at pages[t / page_tokens][h * head_stride +
// (t % page_tokens) * token_stride + d]; pages holds one pointer per
// page_tokens tokens. This is how the engine's K/V (llama::KVState) reaches
// attention(): only key and value views may be paged, page_tokens a positive
// multiple of kKeyChunk, and only the CPU backend reads them.
template <typename T>
struct BasicHeadsView {
  T* data = nullptr;
  int heads = 0;
  int tokens = 0;
  int dim = 0;
  std::ptrdiff_t head_stride = 0;
  std::ptrdiff_t token_stride = 0;
  Device device{};  // host memory unless said otherwise
  T* const* pages = nullptr;
  int page_tokens = 0;

  T* row(int h, int t) const {
    if (pages == nullptr) return data + h * head_stride + t * token_stride;
    return pages[t / page_tokens] + h * head_stride + (t % page_tokens) * token_stride;
  }

  // The same rows as a view of any dtype (float32). A paged view becomes
  // one with null data, which every any-dtype entry point refuses: pages are
  // read by attention() and attention_rows() only.
  operator AnyHeadsView() const { return {data, DType::kF32, heads, tokens, dim, head_stride, token_stride, device}; }
  operator MutableAnyHeadsView() const
    requires(!std::is_const_v<T>)
  {
    return {data, DType::kF32, heads, tokens, dim, head_stride, token_stride, device};
  }

  // [heads, tokens, dim], row-major.
  static BasicHeadsView contiguous(T* data, int heads, int tokens, int dim, Device device = {}) {
    return {data, heads, tokens, dim, static_cast<std::ptrdiff_t>(tokens) * dim, dim, device};
  }
  // [tokens, heads, dim], row-major: the layout a QKV projection produces.
  static BasicHeadsView token_major(T* data, int heads, int tokens, int dim, Device device = {}) {
    return {data, heads, tokens, dim, dim, static_cast<std::ptrdiff_t>(heads) * dim, device};
  }
  // token_major() rows split over pages of page_tokens tokens, each page's
  // rows token_stride apart (a KVState page's plane: kv_dim).
  static BasicHeadsView paged(T* const* pages, int page_tokens, int heads, int tokens, int dim,
                              std::ptrdiff_t token_stride) {
    return {nullptr, heads, tokens, dim, dim, token_stride, Device::cpu(), pages, page_tokens};
  }
};

using HeadsView = BasicHeadsView<const float>;
using MutableHeadsView = BasicHeadsView<float>;

inline HeadsView as_const(const MutableHeadsView& v) {
  return {v.data, v.heads, v.tokens, v.dim, v.head_stride, v.token_stride, v.device, v.pages, v.page_tokens};
}
inline AnyHeadsView as_const(const MutableAnyHeadsView& v) {
  return {v.data, v.dtype, v.heads, v.tokens, v.dim, v.head_stride, v.token_stride, v.device};
}

// A float32 view of any-dtype rows; the caller has checked v.dtype == kF32.
template <typename Void>
auto as_float(const BasicAnyHeadsView<Void>& v) {
  using F = std::conditional_t<std::is_const_v<Void>, const float, float>;
  return BasicHeadsView<F>{static_cast<F*>(v.data), v.heads, v.tokens, v.dim, v.head_stride, v.token_stride, v.device};
}

// Row-major [rows, cols] matrix of float32 (prefix embeddings).
struct MatrixView {
  const float* data = nullptr;
  int rows = 0;
  int cols = 0;
  Device device{};  // host memory unless said otherwise
};

}  // namespace attention_echo
