// Block-sparse echo (docs/architecture.md, "Tiers"): a miss records which key
// tiles carry sparse_mass of each query tile's attention; a similar prefix's
// hit recomputes exact values on those tiles only, with the new q/k/v.
#include <algorithm>
#include <utility>

#include "cache/tier.hpp"

namespace attention_echo::cache {
namespace {

// The kept tiles as the capturing backend prepared them (a device plan for
// a CUDA call), with their TileSet on the host.
struct SparsePayload final : TierPayload {
  std::unique_ptr<const kernels::KeptTiles> kept;
  std::size_t bytes() const override { return kept->bytes(); }
};

const kernels::TileSet& tiles_of(const TierPayload& payload) {
  return static_cast<const SparsePayload&>(payload).kept->tiles();
}

// Kept tiles of the causal prefix block [0, rows) over all of its tiles.
double kept_fraction(const kernels::TileSet& kept, int rows) {
  const int tiles = (rows + kept.block - 1) / kept.block;
  double kept_tiles = 0, all_tiles = 0;
  for (int h = 0; h < kept.heads; ++h)
    for (int i = 0; i < tiles; ++i) {
      const std::size_t row = static_cast<std::size_t>(h) * kept.tiles + i;
      for (std::uint32_t c = kept.offsets[row]; c < kept.offsets[row + 1]; ++c) kept_tiles += kept.cols[c] < tiles;
      all_tiles += tiles == 0 ? 0 : std::min(i + 1, tiles);
    }
  return all_tiles > 0 ? kept_tiles / all_tiles : 1.0;
}

std::string tile_set_problem(const kernels::TileSet& t, const KeySpace& space, int prefix) {
  // The block first: the tile count divides by it (a block of 0 in a file
  // was a division by zero, found by fuzz_snapshot). The count in 64 bits:
  // a file's prefix near INT_MAX overflowed it (fuzz_snapshot again).
  if ((t.block != 32 && t.block != 64) || t.heads != space.heads ||
      t.tiles != (std::int64_t{prefix} + t.block - 1) / t.block)
    return "tile set shape";
  if (t.offsets.size() != static_cast<std::size_t>(t.heads) * t.tiles + 1 || t.offsets.front() != 0 ||
      t.offsets.back() != t.cols.size())
    return "tile offsets";
  if (!std::ranges::is_sorted(t.offsets)) return "tile offsets not ascending";
  if (std::ranges::any_of(t.cols, [&](std::uint16_t c) { return c >= t.tiles; })) return "tile index out of range";
  return "";
}

class SparseTier final : public ReuseTier {
 public:
  explicit SparseTier(const EchoConfig& config)
      : block_(static_cast<int>(config.block_size)), keep_mass_(config.sparse_mass) {}

  Tier kind() const override { return Tier::kSparse; }
  Match match() const override { return Match::kSimilarKey; }
  Capture capture_stage() const override { return Capture::kInKernel; }
  bool approximate() const override { return true; }

  std::unique_ptr<const TierPayload> capture(const Call& call, const kernels::Backend& backend) const override {
    auto p = std::make_unique<SparsePayload>();
    p->kept = backend.exact_rows_with_kept_tiles(call.problem, call.prefix, block_, keep_mass_);
    return p;
  }

  // Rows [0, min(p, p_c)): cost is the kept share of the tiles.
  Served serve(const Call& call, const TierPayload& payload, int stored_prefix,
               const kernels::Backend& backend) const override {
    const kernels::KeptTiles& kept = *static_cast<const SparsePayload&>(payload).kept;
    const int rows = std::min(call.prefix, stored_prefix);
    backend.sparse_rows(call.problem, rows, kept);
    const double share = kept_fraction(kept.tiles(), rows);
    return {rows, share, share};
  }

  void write(const TierPayload& payload, BinaryWriter& out) const override {
    const kernels::TileSet& t = tiles_of(payload);
    for (int field : {t.block, t.tiles, t.heads}) out.put<std::int32_t>(field);
    out.put_vector(t.offsets);
    out.put_vector(t.cols);
  }

  std::unique_ptr<const TierPayload> read(BinaryReader& in) const override {
    kernels::TileSet t;
    t.block = in.get<std::int32_t>("tile block");
    t.tiles = in.get<std::int32_t>("tile count");
    t.heads = in.get<std::int32_t>("tile heads");
    t.offsets = in.get_vector<std::uint32_t>("tile offsets");
    t.cols = in.get_vector<std::uint16_t>("tile columns");
    auto p = std::make_unique<SparsePayload>();
    p->kept = std::make_unique<kernels::KeptTiles>(std::move(t));  // snapshots hold host entries only
    return p;
  }

  std::string validate(const TierPayload& payload, const KeySpace& space, int prefix) const override {
    return tile_set_problem(tiles_of(payload), space, prefix);
  }

 private:
  int block_;
  double keep_mass_;
};

}  // namespace

std::unique_ptr<const ReuseTier> make_sparse_tier(const EchoConfig& config) {
  return std::make_unique<SparseTier>(config);
}

}  // namespace attention_echo::cache
