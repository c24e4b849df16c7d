// The one tiled online-softmax attention kernel (FlashAttention-style, never a
// T x T buffer) and the ways the library drives it: every key tile a row sees
// (exact, optionally capturing the prefix block's tile mass or logits), a
// stored list of kept key tiles (sparse echo), single rows (the verification
// guard), and scores loaded from stored logits instead of computed (dense
// echo). Key tiles are always aligned at token 0, and a row's result does not
// depend on which other rows share its query block, so the same row computed
// by any entry point is bit-identical.
//
// These drivers are the CPU backend's implementation (cpu_backend.hpp): the
// rest of the library calls them through a Backend, which picks the ISA's
// tile loop and the pool per call and checks the views' device.
#pragma once

#include <cstdint>
#include <span>
#include <type_traits>
#include <vector>

#include "attention_echo/tensor.hpp"
#include "attention_echo/thread_pool.hpp"

namespace attention_echo::kernels {

struct RowBlock;

// Rows are named by their position i in the sequence: q and out hold
// positions [query_offset, T) (query_offset + q.tokens == T == k.tokens).
// AttentionProblem is the host drivers' float32 form; AnyAttentionProblem,
// views of any dtype and device, is what the backend seam takes.
template <typename In, typename Out>
struct BasicAttentionProblem {
  In q;     // [H, T - query_offset, D]
  In k;     // [Hkv, T, D]
  In v;     // [Hkv, T, D]
  Out out;  // like q
  float scale = 1.0f;
  bool causal = true;
  int prefix_length = 0;  // see attention.hpp for the non-causal mask
  int query_offset = 0;

  // One past the last position: T.
  int rows_end() const { return query_offset + q.tokens; }
  auto query(int h, int i) const { return q.row(h, i - query_offset); }
  auto output(int h, int i) const { return out.row(h, i - query_offset); }
  // One past the last key row i attends to.
  int key_end(int i) const {
    if (causal) return i + 1;
    return i < prefix_length ? prefix_length : k.tokens;
  }
  int kv_head(int h) const { return h / (q.heads / k.heads); }

  // A float32 problem as one of any dtype (the backend seam's form). A
  // template, so the any-dtype problem itself declares no conversion to its
  // own type.
  template <typename To>
    requires(std::is_same_v<To, BasicAttentionProblem<AnyHeadsView, MutableAnyHeadsView>> &&
             !std::is_same_v<In, AnyHeadsView>)
  operator To() const {
    return {q, k, v, out, scale, causal, prefix_length, query_offset};
  }
};

using AttentionProblem = BasicAttentionProblem<HeadsView, MutableHeadsView>;
using AnyAttentionProblem = BasicAttentionProblem<AnyHeadsView, MutableAnyHeadsView>;

// What one CPU call runs on: the tile loop compiled for the ISA the backend
// chose for the call, and the pool its tasks go to.
struct CpuTarget {
  void (*run_block)(const RowBlock&);
  ThreadPool& pool;
};

// Mean attention mass of query tile I on key tile J over the prefix block,
// per query head: mass[(h * tiles + I) * tiles + J], rows of a tile averaged.
// A row's masses sum to 1, so each (h, I) row of tiles sums to 1 too.
struct TileMass {
  int block = 64;
  int tiles = 0;
  std::vector<float> mass;
};

// Kept key tiles per (query head, query tile) of the prefix block, ascending,
// in CSR form: tiles of (h, I) are cols[offsets[h*tiles+I] .. offsets[h*tiles+I+1]).
struct TileSet {
  int block = 64;
  int tiles = 0;
  int heads = 0;
  std::vector<std::uint32_t> offsets;
  std::vector<std::uint16_t> cols;
};

// Where the scaled logits scale * q_i . k_j of a prefix block [0, prefix) of
// every head live in one buffer: head h at h * head_size(); causal: row i at
// i * (i + 1) / 2 with its i + 1 keys (so the first r rows of a longer prefix
// are a prefix of it); non-causal: row i at i * prefix with all prefix keys.
struct LogitLayout {
  int prefix = 0;
  bool causal = true;

  std::size_t head_size() const {
    const auto p = static_cast<std::size_t>(prefix);
    return causal ? p * (p + 1) / 2 : p * p;
  }
  std::size_t row_offset(int row) const {
    const auto r = static_cast<std::size_t>(row);
    return causal ? r * (r + 1) / 2 : r * static_cast<std::size_t>(prefix);
  }
};

// Exact rows [row_begin, row_end) of every head into problem.out. When mass is
// non-null, also fills it for the prefix block rows [0, prefix) with tiles of
// mass->block (row_begin must be 0 and the kernel's tiles are mass->block).
// mass->block must be a multiple of 32; recording does not change a bit of
// the output. When logits is non-null, also writes the logits of the prefix
// block rows in [row_begin, min(row_end, prefix)) to it, laid out as
// LogitLayout{prefix, problem.causal} says: the scores the kernel computes
// anyway, so this costs stores only and does not change a bit of the output
// either. Non-causal tile mass and logits need problem.prefix_length ==
// prefix (so prefix rows see exactly the prefix keys).
//
// All drivers: the problem is assumed validated (validate_attention_inputs)
// and in host memory; their own arguments are checked and a bad one throws
// std::invalid_argument naming it (row_begin, row_end, rows, prefix, block,
// kept, result, problem). Safe to call concurrently on one pool. Rows are
// bit-identical across entry points and thread counts for one ISA path.
void exact_rows(const CpuTarget& cpu, const AttentionProblem& problem, int row_begin, int row_end, TileMass* mass,
                int prefix, float* logits);

// Prefix rows [0, rows) of every head, each attending only to its kept key
// tiles (clipped to the row's own key range). Cost is proportional to the
// kept tiles. With every tile kept it equals exact_rows bit for bit. A row
// whose kept tiles hold none of its keys gets zeros. Needs query_offset 0,
// like every prefix-block driver.
void sparse_rows(const CpuTarget& cpu, const AttentionProblem& problem, int rows, const TileSet& kept);

// Exact outputs for the given rows of every head: result.row(h, r) gets row
// rows[r] of head h; result is [H, rows.size(), D]. Bit-identical to what
// exact_rows writes for those rows.
void selected_rows(const CpuTarget& cpu, const AttentionProblem& problem, std::span<const int> rows,
                   const MutableHeadsView& result);

// Prefix rows [0, rows) of every head with stored scores instead of q.k: row
// i's logit of key j is logits[h * layout.head_size() + layout.row_offset(i)
// + j] plus, when shift is non-null, shift[h * shift_stride + j] (natural
// units, like the logits; it must cover every key j < rows, or < prefix
// non-causal). Then the same online softmax and PV with problem.v; q and k
// are not read. rows <= min(T, layout.prefix); layout.causal must be
// problem.causal, and non-causal needs layout.prefix == problem.prefix_length.
// On logits exact_rows captured and no shift, a row equals exact_rows' up to
// the rounding of the logits' round trip through natural units.
void cached_rows(const CpuTarget& cpu, const AttentionProblem& problem, int rows, const float* logits,
                 const LogitLayout& layout, const float* shift, int shift_stride);

// Throws std::invalid_argument("problem: ...") unless query_offset is 0: the
// prefix-block drivers address rows [0, rows) of q and out.
void require_prefix_rows(const AttentionProblem& problem);

// Kept tiles: per (h, I) the fewest key tiles covering >= keep_mass of the
// tile row's mass, always with tile 0 (the sink) and the diagonal tile I.
TileSet select_tiles(const TileMass& mass, int heads, double keep_mass);

}  // namespace attention_echo::kernels
