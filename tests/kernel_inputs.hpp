// q/k/v/out buffers of one attention problem for the kernel suites, viewed
// head-major or token-major (strided) as a test chooses.
#pragma once

#include <cmath>
#include <vector>

#include "attention_echo/tensor.hpp"
#include "kernels/attention_kernel.hpp"

namespace attention_echo::testing {

struct KernelInputs {
  int heads, kv_heads, tokens, dim;
  bool token_major = false;
  std::vector<float> q, k, v, out;

  template <class T>
  BasicHeadsView<T> view(T* data, int h) const {
    return token_major ? BasicHeadsView<T>::token_major(data, h, tokens, dim)
                       : BasicHeadsView<T>::contiguous(data, h, tokens, dim);
  }
  HeadsView qv() const { return view(q.data(), heads); }
  HeadsView kv() const { return view(k.data(), kv_heads); }
  HeadsView vv() const { return view(v.data(), kv_heads); }
  MutableHeadsView ov() { return view(out.data(), heads); }
  double scale() const { return 1.0 / std::sqrt(static_cast<double>(dim)); }
  kernels::AttentionProblem problem(bool causal = true, int prefix_length = 0) {
    return {qv(), kv(), vv(), ov(), 1.0f / std::sqrt(static_cast<float>(dim)), causal, prefix_length};
  }
};

}  // namespace attention_echo::testing
