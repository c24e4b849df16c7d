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
// and the diagonal first, then the heaviest others (ties: the lower index)
// until covered. Tiles with no mass are never needed, which also ends the
// loop when rounding keeps the running sum a hair under a keep_mass of 1.
// Kept sets are mostly a few tiles of hundreds, so the order is found
// heaviest-first in growing batches (partial sorts) rather than by sorting
// the whole row: 512-tile rows (32k tokens) were 400 ms of a GPU miss.
void select_row(const float* mass, int tiles, int diagonal, double keep_mass, std::vector<int>& order,
                std::vector<char>& keep) {
  keep.assign(tiles, 0);
  keep[0] = keep[diagonal] = 1;
  const double total = std::accumulate(mass, mass + tiles, 0.0);
  double covered = mass[0] + (diagonal != 0 ? mass[diagonal] : 0.0);
  order.resize(tiles);
  std::iota(order.begin(), order.end(), 0);
  const auto heavier = [&](int a, int b) { return mass[a] > mass[b] || (mass[a] == mass[b] && a < b); };
  for (int done = 0, batch = std::min(tiles, 16); done < tiles; batch = std::min(tiles, 4 * batch)) {
    std::partial_sort(order.begin() + done, order.begin() + batch, order.end(), heavier);
    for (; done < batch; ++done) {
      const int j = order[done];
      if (covered >= keep_mass * total || mass[j] <= 0.0f) return;
      if (keep[j]) continue;
      keep[j] = 1;
      covered += mass[j];
    }
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
