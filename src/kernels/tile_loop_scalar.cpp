// The tile loop in plain C++ for CPUs without AVX2: a "vector" is one float.
#include <cstdint>

#include "kernels/row_block.hpp"

namespace attention_echo::kernels {
namespace {

struct Scalar {
  using reg = float;
  static constexpr int W = 1;
  static constexpr int kScoreRows = 4;   // row vectors x keys per score micro-tile
  static constexpr int kScoreKeys = 2;
  static constexpr int kValueAcc = 8;    // accumulators per value micro-tile,
  static constexpr int kValueStrip = 8;   // of this many dim vectors per row

  static reg zero() { return 0.0f; }
  static reg set1(float x) { return x; }
  static reg load(const float* p) { return *p; }
  static void store(float* p, reg x) { *p = x; }
  static void store_n(float* p, reg x, int n) {
    if (n > 0) *p = x;
  }
  // Two roundings: the baseline ISA has no FMA (and ISO C++ mode does not
  // contract), so every build computes the same bits.
  static reg mul_add(reg a, reg b, reg c) { return a * b + c; }
  static reg mul(reg a, reg b) { return a * b; }
  static reg add(reg a, reg b) { return a + b; }
  static reg sub(reg a, reg b) { return a - b; }
  static reg max(reg a, reg b) { return a > b ? a : b; }
  // Adding and subtracting 1.5 * 2^23 rounds |x| < 2^22 to nearest even.
  static reg round(reg x) { return (x + 12582912.0f) - 12582912.0f; }
  static reg pow2_scale(reg p, reg n) {
    std::uint32_t bits;
    __builtin_memcpy(&bits, &p, sizeof bits);
    bits += static_cast<std::uint32_t>(static_cast<std::int32_t>(n)) << 23;
    __builtin_memcpy(&p, &bits, sizeof bits);
    return p;
  }
  static reg zero_below(reg r, reg x, float limit) { return x >= limit ? r : 0.0f; }
  static reg keep_below(reg s, reg key_end, float key) { return key < key_end ? s : -__builtin_inff(); }
  // r, and 1 where a == b.
  static reg one_where_equal(reg r, reg a, reg b) { return a == b ? 1.0f : r; }
  static reg finite_or_zero(reg m) { return m == -__builtin_inff() ? 0.0f : m; }
  static void transpose(const float* const* rows, int d, float scale, float* dst, int) { *dst = rows[0][d] * scale; }
};

}  // namespace
}  // namespace attention_echo::kernels

#include "kernels/tile_loop.hpp"

namespace attention_echo::kernels {

void run_block_scalar(const RowBlock& block) { TileLoop<Scalar>(block).run(); }

}  // namespace attention_echo::kernels
