// The entry points of the tile loop: they only decide which rows go together
// into a RowBlock (rows of one kv head, at most kMaxRows), which key chunks
// each block walks and where its scores come from (q.k, or stored logits);
// the per-ISA tile loop does all the math.
#include "kernels/attention_kernel.hpp"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <numeric>
#include <string>

#include "core/errors.hpp"
#include "kernels/row_block.hpp"

namespace attention_echo::kernels {
namespace {

static_assert(kKeyChunk % kChunk == 0, "a page of a multiple of kKeyChunk tokens holds whole chunks");

constexpr float kLog2e = 1.44269504088896340736f;
constexpr float kLn2 = 0.69314718055994530942f;  // 1 / kLog2e: log2 units back to logits
// Query tokens per task: one full RowBlock per head, and still 32 tasks at
// T = 512, H = 8 to balance the causal mask's uneven work over threads.
constexpr int kTaskTokens = 128;

int ceil_div(int a, int b) { return (a + b - 1) / b; }

using BlockFn = void (*)(const RowBlock&);

// One query row to compute and where its output goes.
struct Row {
  int head;
  int token;
  float* out;
};

// Per-thread buffers, reused across calls.
struct Workspace {
  std::vector<float> scratch;
  std::vector<Row> rows;
  std::vector<KeyChunk> chunks;
  std::vector<float> log;
  std::vector<double> mass;
  std::vector<float*> capture;
  std::vector<const float*> cached;
  std::vector<float> shift;
  std::vector<const float*> k_pages, v_pages;

  float* aligned_scratch(int dim) {
    scratch.resize(scratch_floats(dim) + 16);
    const auto misalign = reinterpret_cast<std::uintptr_t>(scratch.data()) % 64;
    return scratch.data() + (64 - misalign) % 64 / sizeof(float);
  }
};

Workspace& workspace() {
  thread_local Workspace w;
  return w;
}

// Where each page of a paged K or V view starts for kv head `kv`.
void page_starts(const HeadsView& view, int kv, std::vector<const float*>& starts) {
  starts.clear();
  for (int t = 0; t < view.tokens; t += view.page_tokens) starts.push_back(view.row(kv, t));
}

// A block for rows that all read one kv head; chunks are set by the caller.
RowBlock make_block(const AttentionProblem& p, std::span<const Row> rows, Workspace& w) {
  RowBlock b;
  b.rows = static_cast<int>(rows.size());
  b.dim = p.q.dim;
  for (int r = 0; r < b.rows; ++r) {
    b.q[r] = p.query(rows[r].head, rows[r].token);
    b.out[r] = rows[r].out;
    b.key_end[r] = p.key_end(rows[r].token);
  }
  const int kv = p.kv_head(rows[0].head);
  if (p.k.pages != nullptr) {
    page_starts(p.k, kv, w.k_pages);
    page_starts(p.v, kv, w.v_pages);
    b.k_pages = w.k_pages.data();
    b.v_pages = w.v_pages.data();
    b.page_tokens = p.k.page_tokens;
  } else {
    b.k = p.k.row(kv, 0);
    b.v = p.v.row(kv, 0);
  }
  b.k_stride = p.k.token_stride;
  b.v_stride = p.v.token_stride;
  b.logit_scale = p.scale * kLog2e;
  b.scratch = w.aligned_scratch(b.dim);
  return b;
}

int key_limit(const RowBlock& b) { return *std::max_element(b.key_end, b.key_end + b.rows); }

void run(RowBlock& b, const std::vector<KeyChunk>& chunks, BlockFn fn) {
  b.chunks = chunks.data();
  b.chunk_count = static_cast<int>(chunks.size());
  fn(b);
}

// Keys [begin, end) as chunks, cut at multiples of kChunk. A range that
// continues the last chunk extends it, so kept tiles that are neighbours run
// as one chunk, and with every tile kept the chunks are exact_rows' own.
void add_chunks(int begin, int end, std::vector<KeyChunk>& chunks) {
  while (begin < end) {
    const int stop = std::min((begin / kChunk + 1) * kChunk, end);
    if (!chunks.empty() && chunks.back().end == begin && begin % kChunk != 0)
      chunks.back().end = stop;
    else
      chunks.push_back({begin, stop});
    begin = stop;
  }
}

// Logs a block's per-chunk softmax statistics into w.log.
void attach_log(RowBlock& b, std::size_t chunks, Workspace& w) {
  const std::size_t stride = row_stride(b.rows), segments = chunks * (kChunk / kSegment);
  w.log.resize((segments + chunks + 2) * stride);
  float* p = w.log.data();
  b.log = {p, p + segments * stride, p + (segments + chunks) * stride, p + (segments + chunks + 1) * stride};
}

// Adds each prefix row's final softmax mass per key tile J to
// table[((head - head0) * query_tiles + I - tile0) * tiles + J], I the row's
// query tile: a chunk's partial sums, taken relative to the running max of
// their time, rescaled to the row's final max and sum.
void add_tile_mass(const RowBlock& b, std::span<const Row> rows, int prefix, const TileMass& mass, int head0,
                   int tile0, int query_tiles, double* table) {
  const int stride = row_stride(b.rows);
  for (int r = 0; r < b.rows; ++r) {
    if (rows[r].token >= prefix) continue;
    const int query_tile = rows[r].token / mass.block - tile0;
    double* row_mass = table + (static_cast<std::size_t>(rows[r].head - head0) * query_tiles + query_tile) * mass.tiles;
    const double max = b.log.row_max[r], sum = b.log.row_sum[r];
    for (int c = 0; c < b.chunk_count; ++c) {
      const double scale = std::exp2(b.log.chunk_max[c * stride + r] - max) / sum;
      for (int g = 0, key = b.chunks[c].begin; key < std::min(b.chunks[c].end, prefix); ++g, key += kSegment)
        row_mass[key / mass.block] += b.log.segment_sum[(c * (kChunk / kSegment) + g) * stride + r] * scale;
    }
  }
}

void check_row_range(const AttentionProblem& p, int row_begin, int row_end) {
  if (row_begin < p.query_offset || row_begin > row_end)
    throw_invalid("row_begin", "must be in [query_offset = " + std::to_string(p.query_offset) + ", row_end]");
  if (row_end > p.rows_end()) throw_invalid("row_end", "must be <= T = " + std::to_string(p.rows_end()));
}

void prepare_mass(const AttentionProblem& p, TileMass& mass, int row_begin, int row_end, int prefix) {
  if (mass.block <= 0 || mass.block % kSegment != 0)
    throw_invalid("block", "tile mass needs a positive multiple of " + std::to_string(kSegment));
  if (row_begin != 0) throw_invalid("row_begin", "must be 0 when recording tile mass");
  if (prefix < 0 || prefix > row_end) throw_invalid("prefix", "must be in [0, row_end]");
  if (!p.causal && p.prefix_length != prefix)
    throw_invalid("prefix", "must equal the problem's prefix_length for non-causal tile mass");
  mass.tiles = ceil_div(prefix, mass.block);
  mass.mass.assign(static_cast<std::size_t>(p.q.heads) * mass.tiles * mass.tiles, 0.0f);
}

// Query tokens [t0, t1) of the heads of kv head kv, in blocks of kMaxRows
// rows (token-major, so a block's rows share their key range), over every key
// chunk below the block's key limit. With mass, [t0, t1) is whole tiles.
void exact_task(const AttentionProblem& p, int kv, int t0, int t1, TileMass* mass, int prefix, float* logits,
                BlockFn fn) {
  Workspace& w = workspace();
  const int group = p.q.heads / p.k.heads;
  const int head0 = kv * group;
  w.rows.clear();
  for (int t = t0; t < t1; ++t)
    for (int h = head0; h < head0 + group; ++h) w.rows.push_back({h, t, p.output(h, t)});
  const bool log = mass != nullptr && t0 < prefix;
  const int tile0 = log ? t0 / mass->block : 0;
  const int query_tiles = log ? ceil_div(std::min(t1, prefix) - t0, mass->block) : 0;
  if (log) w.mass.assign(static_cast<std::size_t>(group) * query_tiles * mass->tiles, 0.0);

  for (std::size_t first = 0; first < w.rows.size(); first += kMaxRows) {
    const auto rows = std::span<const Row>(w.rows).subspan(first, std::min<std::size_t>(kMaxRows, w.rows.size() - first));
    RowBlock b = make_block(p, rows, w);
    w.chunks.clear();
    add_chunks(0, key_limit(b), w.chunks);
    if (log) attach_log(b, w.chunks.size(), w);
    if (logits != nullptr && rows.front().token < prefix) {
      // Token-major rows: the first is the block's earliest.
      const LogitLayout layout{prefix, p.causal};
      w.capture.resize(rows.size());
      for (std::size_t r = 0; r < rows.size(); ++r)
        w.capture[r] = rows[r].token < prefix
                           ? logits + layout.head_size() * rows[r].head + layout.row_offset(rows[r].token)
                           : nullptr;
      b.capture = w.capture.data();
      b.capture_scale = kLn2;
    }
    run(b, w.chunks, fn);
    if (log) add_tile_mass(b, rows, prefix, *mass, head0, tile0, query_tiles, w.mass.data());
  }
  // Each tile's mean over its prefix rows.
  for (int h = 0; h < group && log; ++h)
    for (int i = 0; i < query_tiles; ++i) {
      const int tile = tile0 + i;
      const double rows_in_tile = std::min((tile + 1) * mass->block, prefix) - tile * mass->block;
      for (int j = 0; j < mass->tiles; ++j)
        mass->mass[(static_cast<std::size_t>(head0 + h) * mass->tiles + tile) * mass->tiles + j] = static_cast<float>(
            w.mass[(static_cast<std::size_t>(h) * query_tiles + i) * mass->tiles + j] / rows_in_tile);
    }
}

void check_tile_set(const AttentionProblem& p, int rows, const TileSet& kept) {
  if (kept.block <= 0 || kept.block % kSegment != 0)
    throw_invalid("kept", "block must be a positive multiple of " + std::to_string(kSegment));
  if (kept.heads != p.q.heads) throw_invalid("kept", "heads != the problem's query heads");
  if (kept.offsets.size() != static_cast<std::size_t>(kept.heads) * kept.tiles + 1 ||
      kept.offsets.back() != kept.cols.size())
    throw_invalid("kept", "offsets do not match heads * tiles and cols");
  for (auto col : kept.cols)
    if (col >= kept.tiles) throw_invalid("kept", "tile index out of range");
  if (rows < 0 || rows > p.rows_end() || rows > kept.tiles * kept.block)
    throw_invalid("rows", "must be in [0, min(T, tiles * block)]");
}

}  // namespace

void require_prefix_rows(const AttentionProblem& problem) {
  if (problem.query_offset != 0) throw_invalid("problem", "query_offset must be 0 for prefix-block rows");
}

void exact_rows(const CpuTarget& cpu, const AttentionProblem& problem, int row_begin, int row_end, TileMass* mass,
                int prefix, float* logits) {
  check_row_range(problem, row_begin, row_end);
  if (mass != nullptr) prepare_mass(problem, *mass, row_begin, row_end, prefix);
  if (logits != nullptr) {
    if (prefix < 0 || prefix > problem.rows_end()) throw_invalid("prefix", "must be in [0, T] when capturing logits");
    if (!problem.causal && problem.prefix_length != prefix)
      throw_invalid("prefix", "must equal the problem's prefix_length for non-causal logits");
  }
  if (row_begin == row_end) return;
  // With mass, whole tiles per task, so each task owns its rows of the table.
  const int span = mass != nullptr ? mass->block * std::max(1, kTaskTokens / mass->block) : kTaskTokens;
  const int spans = ceil_div(row_end - row_begin, span);
  const int kv_heads = problem.k.heads;
  cpu.pool.parallel_for(static_cast<std::size_t>(spans) * kv_heads, [&](std::size_t i) {
    // Later query tokens see more keys under the causal mask: hand them out first.
    const int t0 = row_begin + (spans - 1 - static_cast<int>(i) / kv_heads) * span;
    exact_task(problem, static_cast<int>(i) % kv_heads, t0, std::min(t0 + span, row_end), mass, prefix, logits,
               cpu.run_block);
  });
}

void sparse_rows(const CpuTarget& cpu, const AttentionProblem& problem, int rows, const TileSet& kept) {
  require_prefix_rows(problem);
  check_tile_set(problem, rows, kept);
  const int heads = problem.q.heads;
  const int tiles = ceil_div(rows, kept.block);
  // Kept tiles differ per head, so a block holds one head's rows of one tile.
  cpu.pool.parallel_for(static_cast<std::size_t>(tiles) * heads, [&](std::size_t i) {
    const int tile = tiles - 1 - static_cast<int>(i) / heads;
    const int h = static_cast<int>(i) % heads;
    const std::size_t slot = static_cast<std::size_t>(h) * kept.tiles + tile;
    const int end = std::min((tile + 1) * kept.block, rows);
    Workspace& w = workspace();
    for (int t0 = tile * kept.block; t0 < end; t0 += kMaxRows) {
      w.rows.clear();
      for (int t = t0; t < std::min(t0 + kMaxRows, end); ++t) w.rows.push_back({h, t, problem.output(h, t)});
      RowBlock b = make_block(problem, w.rows, w);
      const int limit = key_limit(b);
      w.chunks.clear();
      for (auto k = kept.offsets[slot]; k < kept.offsets[slot + 1]; ++k)
        add_chunks(kept.cols[k] * kept.block, std::min((kept.cols[k] + 1) * kept.block, limit), w.chunks);
      run(b, w.chunks, cpu.run_block);
    }
  });
}

void cached_rows(const CpuTarget& cpu, const AttentionProblem& problem, int rows, const float* logits,
                 const LogitLayout& layout, const float* shift, int shift_stride) {
  require_prefix_rows(problem);
  if (layout.causal != problem.causal) throw_invalid("layout", "causal must match the problem's");
  if (!layout.causal && layout.prefix != problem.prefix_length)
    throw_invalid("layout", "non-causal prefix must equal the problem's prefix_length");
  if (rows < 0 || rows > problem.rows_end() || rows > layout.prefix)
    throw_invalid("rows", "must be in [0, min(T, layout.prefix)]");
  if (rows == 0) return;
  if (logits == nullptr) throw_invalid("logits", "must not be null");
  if (shift != nullptr && shift_stride < (layout.causal ? rows : layout.prefix))
    throw_invalid("shift_stride", "shift must cover every key the rows see");
  const int heads = problem.q.heads;
  const int blocks = ceil_div(rows, kMaxRows);
  // Stored logits differ per head, so a block holds one head's rows; later
  // rows see more keys under the causal mask: hand them out first.
  cpu.pool.parallel_for(static_cast<std::size_t>(blocks) * heads, [&](std::size_t i) {
    const int t0 = (blocks - 1 - static_cast<int>(i) / heads) * kMaxRows;
    const int h = static_cast<int>(i) % heads;
    Workspace& w = workspace();
    w.rows.clear();
    w.cached.clear();
    const float* head_logits = logits + layout.head_size() * h;
    for (int t = t0; t < std::min(t0 + kMaxRows, rows); ++t) {
      w.rows.push_back({h, t, problem.output(h, t)});
      w.cached.push_back(head_logits + layout.row_offset(t));
    }
    RowBlock b = make_block(problem, w.rows, w);
    b.cached = w.cached.data();
    b.cached_scale = kLog2e;
    const int limit = key_limit(b);
    if (shift != nullptr) {
      w.shift.resize(limit);
      const float* head_shift = shift + static_cast<std::size_t>(h) * shift_stride;
      for (int j = 0; j < limit; ++j) w.shift[j] = head_shift[j] * kLog2e;
      b.cached_shift = w.shift.data();
    }
    w.chunks.clear();
    add_chunks(0, limit, w.chunks);
    run(b, w.chunks, cpu.run_block);
  });
}

void selected_rows(const CpuTarget& cpu, const AttentionProblem& problem, std::span<const int> rows,
                   const MutableHeadsView& result) {
  if (result.heads != problem.q.heads || result.tokens != static_cast<int>(rows.size()) ||
      result.dim != problem.q.dim || (!rows.empty() && result.data == nullptr))
    throw_invalid("result", "must be [H, rows, D] of the problem");
  for (int t : rows)
    if (t < problem.query_offset || t >= problem.rows_end())
      throw_invalid("rows", "row " + std::to_string(t) + " outside [query_offset, T)");
  if (rows.empty()) return;
  // Rows sorted by token share their key ranges best within a block.
  std::vector<int> order(rows.size());
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](int a, int b) { return rows[a] < rows[b]; });

  const int n = static_cast<int>(rows.size());
  const int group = problem.q.heads / problem.k.heads;
  const int kv_heads = problem.k.heads;
  const int per_kv = n * group;
  // Small blocks when there are few rows, so every thread gets some.
  const int per_block = std::clamp(ceil_div(per_kv * kv_heads, cpu.pool.size()), 1, kMaxRows);
  const int blocks = ceil_div(per_kv, per_block);
  cpu.pool.parallel_for(static_cast<std::size_t>(kv_heads) * blocks, [&](std::size_t i) {
    const int kv = static_cast<int>(i) / blocks;
    const int first = static_cast<int>(i) % blocks * per_block;
    Workspace& w = workspace();
    w.rows.clear();
    for (int f = first; f < std::min(first + per_block, per_kv); ++f) {
      const int r = order[f / group], h = kv * group + f % group;
      w.rows.push_back({h, rows[r], result.row(h, r)});
    }
    RowBlock b = make_block(problem, w.rows, w);
    w.chunks.clear();
    add_chunks(0, key_limit(b), w.chunks);
    run(b, w.chunks, cpu.run_block);
  });
}

}  // namespace attention_echo::kernels
