// One block of query rows that share a kv head and walk the same key chunks:
// the unit of work every entry point hands to the per-ISA tile loop. Each row
// carries its own query, output and key range, and nothing a row computes
// depends on the other rows of its block, so the block's composition never
// changes a row's bits.
#pragma once

#include <cstddef>

namespace attention_echo::kernels {

// Key ranges come in segments of kSegment keys counted from token 0: tiles
// (tile mass, sparse support) are whole segments. The loop takes up to
// kChunk keys per online-softmax step, never across a multiple of kChunk, so
// every entry point feeds a row the same steps in the same order: a row's
// last chunk may be cut short, which only drops keys the row cannot see.
inline constexpr int kSegment = 32;
inline constexpr int kChunk = 2 * kSegment;
// Rows per block: bounds the scratch (and keeps it near L1/L2).
inline constexpr int kMaxRows = 128;

// Scratch rows are padded to a multiple of the widest vector (16 floats), so
// one layout serves every ISA. Strides add one more vector: power-of-two
// strides would put every row of qt, s and acc in the same few L1 sets.
constexpr int padded(int n) { return (n + 15) & ~15; }
constexpr int row_stride(int rows) { return padded(rows) + 16; }
constexpr int dim_stride(int dim) { return padded(dim) + 16; }

struct KeyChunk {
  int begin = 0;  // a multiple of kSegment
  int end = 0;    // at most the next multiple of kChunk
};

// Optional per-chunk softmax statistics, for tile mass: row r's softmax
// terms over segment g of chunk c (keys [begin + g kSegment, ...)) sum to
// segment_sum[(c * kChunk / kSegment + g) * stride + r], relative to the
// chunk's running max chunk_max[c * stride + r]; row_max/row_sum are the
// row's final max and normaliser. Maxima are in log2 units (logits times
// log2(e)).
struct SoftmaxLog {
  float* segment_sum = nullptr;
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
  // Paged K/V (k_pages non-null; k and v unused): page p's token 0 of the kv
  // head at k_pages[p] and v_pages[p], token t in page t / page_tokens. A
  // chunk never crosses a page (page_tokens is a multiple of kChunk).
  const float* const* k_pages = nullptr;
  const float* const* v_pages = nullptr;
  int page_tokens = 0;
  float logit_scale = 1.0f;  // softmax scale times log2(e): the loop uses exp2
  const KeyChunk* chunks = nullptr;  // ascending
  int chunk_count = 0;
  float* scratch = nullptr;  // scratch_floats(dim) floats, 64-byte aligned
  SoftmaxLog log;            // stride padded(rows); null pointers: no log

  // Score source (dense echo). Null: scores are logit_scale * q.k, computed.
  // Otherwise row r's score of key j is cached_scale * cached[r][j] +
  // cached_shift[j] (shift null: 0); q and k are not read. cached[r][j] must
  // be readable for every j below the block's last chunk end, also past the
  // row's key_end (those keys are read, then masked like computed ones).
  const float* const* cached = nullptr;
  float cached_scale = 1.0f;
  const float* cached_shift = nullptr;
  // Score capture (dense miss). Non-null: each row r with capture[r]
  // non-null also gets its computed scores times capture_scale written to
  // capture[r][j] for every key j < key_end[r] the chunks cover. Reading the
  // scores does not change a bit of the output.
  float* const* capture = nullptr;
  float capture_scale = 1.0f;
};

inline std::size_t scratch_floats(int dim) {
  // q^T [dim][rows], scores [kChunk][rows], acc [rows][padded dim], max,
  // sum, alpha and key_end per row, and a chunk of values [kChunk][padded dim].
  return static_cast<std::size_t>(row_stride(kMaxRows)) * (dim + kChunk + dim_stride(dim) + 4) +
         static_cast<std::size_t>(kChunk) * dim_stride(dim);
}

// The tile loop, compiled once per ISA (tile_loop_*.cpp).
void run_block_scalar(const RowBlock& block);
void run_block_avx2(const RowBlock& block);
void run_block_avx512(const RowBlock& block);

}  // namespace attention_echo::kernels
