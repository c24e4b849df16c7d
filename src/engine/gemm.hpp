// The engine's matrix multiply: y[m, n] (+)= x[m, k] * W[n, k]^T with W
// packed once at load into column panels, so the inner loop streams one
// contiguous panel and broadcasts x. Projections and the MLP are ~24*T*d^2 of
// a prefill's FLOPs (the rest is attention); this is where that time goes.
#pragma once

#include <cstddef>
#include <vector>

#include "attention_echo/thread_pool.hpp"
#include "core/isa.hpp"

namespace attention_echo::llama {

// W [rows, cols] row-major, stored as ceil(rows / panel) panels of
// [cols, panel] floats (zero-padded past the last row).
struct PackedMatrix {
  int rows = 0;
  int cols = 0;
  int panel = 0;
  Isa isa = Isa::kScalar;  // the layout of data depends on it
  std::vector<float> data;
};

PackedMatrix pack(const float* w, int rows, int cols, Isa isa = active_isa());

// y[i, j] = (accumulate ? y[i, j] : 0) + sum_c x[i, c] * W[j, c] for i < m,
// j < w.rows; x rows are ldx floats apart, y rows ldy.
void gemm(const float* x, std::size_t ldx, int m, const PackedMatrix& w, float* y, std::size_t ldy,
          bool accumulate, ThreadPool& pool);

}  // namespace attention_echo::llama
