#include "cache/host_rows.hpp"

#include <cstring>

namespace attention_echo::cache {

// Four independent multiply-xorshift lanes keep the loop at memory speed
// instead of one long dependency chain.
std::uint64_t fingerprint(const HeadsView& k, int prefix) {
  constexpr std::uint64_t kMul = 0x9fb21c651e98df25ULL;
  std::uint64_t lane[4] = {0x243f6a8885a308d3ULL, 0x13198a2e03707344ULL, 0xa4093822299f31d0ULL,
                           0x082efa98ec4e6c89ULL};
  auto mix = [&](std::uint64_t& h, std::uint64_t word) {
    h = (h ^ word) * kMul;
    h ^= h >> 32;
  };
  for (int kh = 0; kh < k.heads; ++kh)
    for (int t = 0; t < prefix; ++t) {
      const auto* bytes = reinterpret_cast<const unsigned char*>(k.row(kh, t));
      const std::size_t n = sizeof(float) * static_cast<std::size_t>(k.dim);
      std::size_t i = 0;
      for (; i + 32 <= n; i += 32)
        for (int l = 0; l < 4; ++l) {
          std::uint64_t word;
          std::memcpy(&word, bytes + i + 8 * l, 8);
          mix(lane[l], word);
        }
      for (; i + 4 <= n; i += 4) {
        std::uint32_t word;
        std::memcpy(&word, bytes + i, 4);
        mix(lane[0], word);
      }
    }
  std::uint64_t h = lane[0];
  for (int l = 1; l < 4; ++l) mix(h, lane[l]);
  return h;
}

std::vector<float> copy_rows_out(const HeadsView& src, int rows) {
  std::vector<float> dst(static_cast<std::size_t>(src.heads) * rows * src.dim);
  for (int h = 0; h < src.heads; ++h)
    for (int t = 0; t < rows; ++t)
      std::memcpy(dst.data() + (static_cast<std::size_t>(h) * rows + t) * src.dim, src.row(h, t),
                  sizeof(float) * src.dim);
  return dst;
}

void copy_rows_in(const std::vector<float>& src, int rows, const MutableHeadsView& dst) {
  for (int h = 0; h < dst.heads; ++h)
    for (int t = 0; t < rows; ++t)
      std::memcpy(dst.row(h, t), src.data() + (static_cast<std::size_t>(h) * rows + t) * dst.dim,
                  sizeof(float) * dst.dim);
}

}  // namespace attention_echo::cache
