// select_tiles: the sparse tier's support, from the tile mass a miss recorded.
#include <algorithm>
#include <cmath>
#include <numeric>
#include <string>

#include "core/errors.hpp"
#include "kernels/attention_kernel.hpp"

namespace attention_echo::kernels {
namespace {

// Fewest tiles of one (h, I) row covering keep_mass of its total: the sink
// and the diagonal first, then the heaviest others until covered. Tiles with
// no mass are never needed, which also ends the loop when rounding keeps
// the running sum a hair under a keep_mass of 1.
void select_row(const float* mass, int tiles, int diagonal, double keep_mass, std::vector<int>& order,
                std::vector<char>& keep) {
  keep.assign(tiles, 0);
  keep[0] = keep[diagonal] = 1;
  const double total = std::accumulate(mass, mass + tiles, 0.0);
  double covered = mass[0] + (diagonal != 0 ? mass[diagonal] : 0.0);
  order.resize(tiles);
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](int a, int b) { return mass[a] > mass[b]; });
  for (int j : order) {
    if (covered >= keep_mass * total || mass[j] <= 0.0f) break;
    if (keep[j]) continue;
    keep[j] = 1;
    covered += mass[j];
  }
}

}  // namespace

TileSet select_tiles(const TileMass& mass, int heads, double keep_mass) {
  if (!(keep_mass >= 0.0 && keep_mass <= 1.0)) throw_invalid("keep_mass", "must be in [0, 1]");
  if (heads < 0 || mass.mass.size() != static_cast<std::size_t>(heads) * mass.tiles * mass.tiles)
    throw_invalid("mass", "size != heads * tiles * tiles");
  TileSet kept{mass.block, mass.tiles, heads, {0}, {}};
  std::vector<int> order;
  std::vector<char> keep;
  for (int h = 0; h < heads; ++h)
    for (int i = 0; i < mass.tiles; ++i) {
      select_row(mass.mass.data() + (static_cast<std::size_t>(h) * mass.tiles + i) * mass.tiles, mass.tiles, i,
                 keep_mass, order, keep);
      for (int j = 0; j < mass.tiles; ++j)
        if (keep[j]) kept.cols.push_back(static_cast<std::uint16_t>(j));
      kept.offsets.push_back(static_cast<std::uint32_t>(kept.cols.size()));
    }
  return kept;
}

}  // namespace attention_echo::kernels
