// Non-owning views of per-head token rows: element (h, t, d) lives at
// data[h * head_stride + t * token_stride + d]. The innermost (D) stride is
// always 1; the other two let callers pass [H, T, D] or [T, H, D] buffers
// without a copy.
#pragma once

#include <cstddef>

namespace attention_echo {

template <typename T>
struct BasicHeadsView {
  T* data = nullptr;
  int heads = 0;
  int tokens = 0;
  int dim = 0;
  std::ptrdiff_t head_stride = 0;
  std::ptrdiff_t token_stride = 0;

  T* row(int h, int t) const { return data + h * head_stride + t * token_stride; }

  // [heads, tokens, dim], row-major.
  static BasicHeadsView contiguous(T* data, int heads, int tokens, int dim) {
    return {data, heads, tokens, dim, static_cast<std::ptrdiff_t>(tokens) * dim, dim};
  }
  // [tokens, heads, dim], row-major: the layout a QKV projection produces.
  static BasicHeadsView token_major(T* data, int heads, int tokens, int dim) {
    return {data, heads, tokens, dim, dim, static_cast<std::ptrdiff_t>(heads) * dim};
  }
};

using HeadsView = BasicHeadsView<const float>;
using MutableHeadsView = BasicHeadsView<float>;

inline HeadsView as_const(const MutableHeadsView& v) {
  return {v.data, v.heads, v.tokens, v.dim, v.head_stride, v.token_stride};
}

}  // namespace attention_echo
