// One block of query rows that share a kv head and walk the same key chunks:
// the unit of work every entry point hands to the per-ISA tile loop. Each row
// carries its own query, output and key range, and nothing a row computes
// depends on the other rows of its block, so the block's composition never
// changes a row's bits.
#pragma once

#include <cstddef>

namespace attention_echo::kernels {

// Keys per online-softmax step. Chunks start at multiples of kChunk counted
// from token 0, whatever the caller's tiles, so every entry point feeds a row
// the same partial sums in the same order. Sparse tiles are whole chunks.
inline constexpr int kChunk = 32;
// Rows per block: bounds the scratch (and keeps it near L1/L2).
inline constexpr int kMaxRows = 64;

// Scratch rows are padded to a multiple of the widest vector (16 floats), so
// one layout serves every ISA.
constexpr int padded(int n) { return (n + 15) & ~15; }

struct KeyChunk {
  int begin = 0;  // a multiple of kChunk
  int end = 0;    // <= begin + kChunk
};

// Optional per-chunk softmax statistics, for tile mass: row r's chunk c had
// partial sum chunk_sum[c * stride + r] relative to running max
// chunk_max[c * stride + r]; row_max/row_sum are the row's final max and
// normaliser. Maxima are in log2 units (logits times log2(e)).
struct SoftmaxLog {
  float* chunk_sum = nullptr;
  float* chunk_max = nullptr;
  float* row_max = nullptr;
  float* row_sum = nullptr;
};

struct RowBlock {
  int rows = 0;  // <= kMaxRows
  int dim = 0;
  const float* q[kMaxRows];
  float* out[kMaxRows];
  int key_end[kMaxRows];  // row r sees keys [0, key_end[r]) of the chunks below
  const float* k = nullptr;  // kv head's token 0; token t at k + t * k_stride
  const float* v = nullptr;
  std::ptrdiff_t k_stride = 0;
  std::ptrdiff_t v_stride = 0;
  float logit_scale = 1.0f;  // softmax scale times log2(e): the loop uses exp2
  const KeyChunk* chunks = nullptr;  // ascending
  int chunk_count = 0;
  float* scratch = nullptr;  // scratch_floats(dim) floats, 64-byte aligned
  SoftmaxLog log;            // stride padded(rows); null pointers: no log
};

inline std::size_t scratch_floats(int dim) {
  // q^T [dim][rows], scores [kChunk][rows], acc [rows][padded dim], max,
  // sum, alpha and key_end per row, and a chunk of values [kChunk][padded dim].
  return static_cast<std::size_t>(kMaxRows) * (dim + kChunk + padded(dim) + 4) +
         static_cast<std::size_t>(kChunk) * padded(dim);
}

// The tile loop, compiled once per ISA (tile_loop_*.cpp).
void run_block_scalar(const RowBlock& block);
void run_block_avx2(const RowBlock& block);
void run_block_avx512(const RowBlock& block);

}  // namespace attention_echo::kernels
