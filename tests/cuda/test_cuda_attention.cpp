// The CUDA kernels (src/kernels/cuda) against a float64 reference on the
// host, computed from the same fp16/bf16-rounded inputs. Built only with
// -DAE_CUDA=ON; every test skips when no CUDA device is present.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <random>
#include <stdexcept>
#include <string>
#include <vector>

#include "kernels/attention_kernel.hpp"
#include "kernels/cuda/cuda_attention.hpp"
#include "cuda/cuda_fixtures.hpp"

namespace attention_echo::kernels::cuda {
namespace {

using namespace testing;

class CudaAttention : public ::testing::Test {
 protected:
  void SetUp() override {
    if (!has_cuda_device()) GTEST_SKIP() << "no CUDA device";
  }
  double exact_error(const Case& c, unsigned seed, const std::vector<int>* rows = nullptr) {
    Problem p(c, seed);
    exact_attention(p.device(), nullptr);
    ok(cudaDeviceSynchronize());
    return relative_error(p, p.out.download(), rows ? *rows : all_rows(p),
                          [](int, int, int) { return true; });
  }
};

TEST_F(CudaAttention, CausalGqaRaggedLengthBf16) {
  EXPECT_LT(exact_error({8, 2, 1000, 128, DType::kBF16}, 1), tolerance(DType::kBF16));
}

TEST_F(CudaAttention, CausalShortRaggedF16) {
  for (int t : {1, 17, 130})
    EXPECT_LT(exact_error({4, 4, t, 64, DType::kF16}, 2 + t), tolerance(DType::kF16)) << "T = " << t;
}

TEST_F(CudaAttention, NonCausalBidirectionalPrefixMqaF16) {
  Case c{4, 1, 777, 64, DType::kF16};
  c.causal = false;
  c.prefix_length = 300;
  EXPECT_LT(exact_error(c, 3), tolerance(DType::kF16));
}

TEST_F(CudaAttention, SuffixRowsFromQueryOffset) {
  Case c{4, 2, 1000, 128, DType::kBF16};
  c.query_offset = 700;
  EXPECT_LT(exact_error(c, 4), tolerance(DType::kBF16));
}

TEST_F(CudaAttention, LogitsNearOverflow) {
  // q.k * scale around 700: exp of a logit overflows float32 by far; only the
  // running max keeps the softmax finite.
  Case c{4, 2, 600, 128, DType::kBF16};
  c.mean = 8.0f;
  c.sigma = 2.0f;
  EXPECT_LT(exact_error(c, 5), tolerance(DType::kBF16));
}

TEST_F(CudaAttention, LongSequence32kGqa) {
  Case c{4, 1, 32768, 128, DType::kBF16};
  const std::vector<int> rows = long_sequence_rows(12, 6);
  EXPECT_LT(exact_error(c, 6, &rows), tolerance(DType::kBF16));
}

void expect_mass(const Case& c, int prefix, int block) {
  Problem p(c, 7 + block);
  const auto mass = exact_attention_with_tile_mass(p.device(), prefix, block, nullptr).to_host(nullptr);
  const auto ref = reference_mass(p, prefix, block);
  ASSERT_EQ(mass.tiles, (prefix + block - 1) / block);
  ASSERT_EQ(mass.mass.size(), ref.size());
  double worst = 0.0;
  for (std::size_t i = 0; i < ref.size(); ++i) worst = std::max(worst, std::abs(mass.mass[i] - ref[i]));
  EXPECT_LT(worst, 1e-4) << "block " << block;
  EXPECT_LT(relative_error(p, p.out.download(), all_rows(p), [](int, int, int) { return true; }),
            tolerance(c.dtype));
}

TEST_F(CudaAttention, TileMassCausalMatchesReference) {
  expect_mass({4, 2, 700, 64, DType::kBF16}, 600, 64);
  expect_mass({4, 2, 700, 128, DType::kBF16}, 700, 128);
}

TEST_F(CudaAttention, TileMassNonCausalMatchesReference) {
  Case c{2, 2, 900, 64, DType::kF16};
  c.causal = false;
  c.prefix_length = 500;
  expect_mass(c, 500, 128);
}

TEST_F(CudaAttention, MassCaptureKeepsOutputBits) {
  Problem a({8, 2, 1500, 128, DType::kBF16}, 8);
  exact_attention(a.device(), nullptr);
  const auto plain = a.out.download_bits();
  a.out.poison();
  exact_attention_with_tile_mass(a.device(), 1200, 64, nullptr);
  ok(cudaDeviceSynchronize());
  EXPECT_EQ(a.out.download_bits(), plain);
}

TileSet all_causal_tiles(int heads, int tiles, int block) {
  TileSet kept{block, tiles, heads, {0}, {}};
  for (int h = 0; h < heads; ++h)
    for (int i = 0; i < tiles; ++i) {
      for (int j = 0; j <= i; ++j) kept.cols.push_back(static_cast<std::uint16_t>(j));
      kept.offsets.push_back(static_cast<std::uint32_t>(kept.cols.size()));
    }
  return kept;
}

// The sparse hit runs on its own (wgmma) kernel, so its bits differ from the
// exact kernel's; with every tile kept it computes the same function.
TEST_F(CudaAttention, SparseWithEveryTileKeptMatchesExact) {
  for (DType dtype : {DType::kBF16, DType::kF16}) {
    Problem a({4, 2, 1100, 128, dtype}, 9);
    a.out.poison();
    const int prefix = 1000, block = 128;
    const DeviceTilePlan plan(all_causal_tiles(4, (prefix + block - 1) / block, block), prefix, nullptr);
    sparse_attention(a.device(), plan, nullptr);
    ok(cudaDeviceSynchronize());
    std::vector<int> rows(prefix);
    for (int i = 0; i < prefix; ++i) rows[i] = i;
    EXPECT_LT(relative_error(a, a.out.download(), rows, [](int, int, int) { return true; }), tolerance(dtype))
        << to_string(dtype);
  }
}

// The dense causal walk (the sparse kernel over every causal chunk, one plan
// shared by all heads): exact rows and each row's log-sum-exp, for ragged
// and tiny T, GQA/MQA, both dtypes and head dims, logits near overflow.
TEST_F(CudaAttention, DenseCausalWalkMatchesReferenceWithRowLse) {
  std::vector<Case> cases{{8, 2, 1000, 128, DType::kBF16},
                          {4, 4, 1, 64, DType::kF16},
                          {4, 4, 130, 64, DType::kF16},
                          {4, 1, 333, 128, DType::kF16}};
  Case hot{4, 2, 600, 128, DType::kBF16};
  hot.mean = 8.0f;
  hot.sigma = 2.0f;
  cases.push_back(hot);
  for (const Case& c : cases) {
    Problem p(c, 70 + c.tokens);
    p.out.poison();
    const DeviceBuffer lse(static_cast<std::size_t>(c.heads) * c.tokens * sizeof(float));
    dense_causal_attention(p.device(), static_cast<float*>(lse.data()), nullptr);
    ok(cudaDeviceSynchronize());
    EXPECT_LT(relative_error(p, p.out.download(), all_rows(p), [](int, int, int) { return true; }),
              tolerance(c.dtype))
        << "T = " << c.tokens << ", dim " << c.dim;
    std::vector<float> got(static_cast<std::size_t>(c.heads) * c.tokens);
    ok(cudaMemcpy(got.data(), lse.data(), lse.bytes(), cudaMemcpyDeviceToHost));
    double worst = 0.0;
    for (int h = 0; h < c.heads; ++h)
      for (int i : {0, c.tokens / 2, c.tokens - 1}) {
        std::vector<double> logits(i + 1);
        for (int j = 0; j <= i; ++j) {
          double dot = 0.0;
          for (int d = 0; d < c.dim; ++d) dot += static_cast<double>(p.q.at(h, i, d)) * p.k.at(p.kv(h), j, d);
          logits[j] = dot * p.scale();
        }
        const double max = *std::max_element(logits.begin(), logits.end());
        double sum = 0.0;
        for (double x : logits) sum += std::exp(x - max);
        const double want = max + std::log(sum);
        worst = std::max(worst, std::abs(got[static_cast<std::size_t>(h) * c.tokens + i] - want) /
                                    std::max(1.0, std::abs(want)));
      }
    EXPECT_LT(worst, 1e-4) << "T = " << c.tokens << ", dim " << c.dim;
  }
  Case bidirectional{4, 2, 300, 64, DType::kBF16};
  bidirectional.causal = false;
  bidirectional.prefix_length = 100;
  Problem p(bidirectional, 79);
  EXPECT_THROW(dense_causal_attention(p.device(), nullptr, nullptr), std::invalid_argument);
}

// The walk's tile mass, recorded per 64-key chunk in the same pass, against
// float64 over every row (not sampled), for both tile sizes, a prefix block
// shorter than T and ragged T; the output bits are the plain walk's.
TEST_F(CudaAttention, DenseCausalWalkRecordsTheExactTileMass) {
  struct MassCase {
    Case c;
    int prefix, block;
  };
  Case hot{4, 2, 600, 128, DType::kBF16};
  hot.mean = 8.0f;
  hot.sigma = 2.0f;
  const std::vector<MassCase> cases{{{8, 2, 1000, 128, DType::kBF16}, 1000, 64},
                                    {{8, 2, 1000, 128, DType::kBF16}, 777, 128},
                                    {{4, 4, 333, 64, DType::kF16}, 300, 64},
                                    {{4, 1, 70, 64, DType::kF16}, 70, 128},
                                    {hot, 600, 64}};
  for (const MassCase& m : cases) {
    Problem p(m.c, 90 + m.prefix);
    dense_causal_attention(p.device(), nullptr, nullptr);
    ok(cudaDeviceSynchronize());
    const std::vector<std::uint16_t> plain = p.out.download_bits();
    p.out.poison();
    const TileMass mass = dense_causal_attention_with_tile_mass(p.device(), m.prefix, m.block, nullptr).to_host(nullptr);
    EXPECT_EQ(p.out.download_bits(), plain) << "T = " << m.c.tokens;
    ASSERT_EQ(mass.tiles, (m.prefix + m.block - 1) / m.block);
    EXPECT_LT(worst_difference(mass.mass, reference_mass(p, m.prefix, m.block)), 1e-4)
        << "T = " << m.c.tokens << ", prefix " << m.prefix << ", block " << m.block;
  }
}

// Rows computed from a query_offset (an exact hit's suffix) get the bits the
// same rows get in the whole walk (the miss), also where the offset falls
// inside a block; the rows before it are left alone.
TEST_F(CudaAttention, DenseCausalWalkRowsDoNotDependOnTheQueryOffset) {
  for (int offset : {300, 384}) {
    Problem p({8, 2, 1000, 128, DType::kBF16}, 81);
    dense_causal_attention(p.device(), nullptr, nullptr);
    ok(cudaDeviceSynchronize());
    const std::vector<std::uint16_t> whole = p.out.download_bits();
    p.out.poison();
    const std::vector<std::uint16_t> poisoned = p.out.download_bits();
    DeviceProblem suffix = p.device();
    const std::size_t skip = static_cast<std::size_t>(offset) * suffix.q.token_stride * 2;
    suffix.q.data = static_cast<const char*>(suffix.q.data) + skip;
    suffix.out.data = static_cast<char*>(suffix.out.data) + skip;
    suffix.q.tokens -= offset;
    suffix.out.tokens -= offset;
    suffix.query_offset = offset;
    dense_causal_attention(suffix, nullptr, nullptr);
    ok(cudaDeviceSynchronize());
    const std::vector<std::uint16_t> got = p.out.download_bits();
    std::size_t differing = 0, touched = 0;
    for (int h = 0; h < 8; ++h)
      for (int t = 0; t < 1000; ++t)
        for (int d = 0; d < 128; ++d) {
          const std::size_t i = (static_cast<std::size_t>(h) * 1000 + t) * 128 + d;
          if (t >= offset) differing += got[i] != whole[i];
          else touched += got[i] != poisoned[i];
        }
    EXPECT_EQ(differing, 0u) << "offset " << offset;
    EXPECT_EQ(touched, 0u) << "offset " << offset;
  }
}

// The same values token-major ([tokens, heads, dim], a QKV projection's
// layout), uploaded into `into`, and the view of them.
DeviceHeads token_major(const Tensor& src, Tensor& into) {
  std::vector<float> values(src.size());
  for (int h = 0; h < src.heads; ++h)
    for (int t = 0; t < src.tokens; ++t)
      for (int d = 0; d < src.dim; ++d)
        values[(static_cast<std::size_t>(t) * src.heads + h) * src.dim + d] = src.at(h, t, d);
  into.upload(values);
  return {into.device, src.dtype, src.heads, src.tokens, src.dim, src.dim,
          static_cast<std::ptrdiff_t>(src.heads) * src.dim, Device::cuda(0)};
}

// The sparse kernel's copy engine reads through tensor maps built from the
// views' strides: token-major q, k and v give the head-major bits.
TEST_F(CudaAttention, SparseOnTokenMajorViewsMatchesHeadMajor) {
  Problem a({4, 2, 700, 128, DType::kBF16}, 13);
  const DeviceTilePlan plan(all_causal_tiles(4, (700 + 127) / 128, 128), 700, nullptr);
  sparse_attention(a.device(), plan, nullptr);
  Tensor q(4, 700, 128, DType::kBF16), k(2, 700, 128, DType::kBF16), v(2, 700, 128, DType::kBF16);
  Tensor out(4, 700, 128, DType::kBF16);
  out.poison();
  const DeviceProblem strided{token_major(a.q, q), token_major(a.k, k), token_major(a.v, v), out.mutable_view(),
                              a.scale(), true, 0, 0};
  sparse_attention(strided, plan, nullptr);
  ok(cudaDeviceSynchronize());
  EXPECT_EQ(out.download_bits(), a.out.download_bits());
}

bool kept_key(const TileSet& kept, int h, int i, int j) {
  const std::size_t slot = static_cast<std::size_t>(h) * kept.tiles + i / kept.block;
  for (auto at = kept.offsets[slot]; at < kept.offsets[slot + 1]; ++at)
    if (kept.cols[at] == j / kept.block) return true;
  return false;
}

TEST_F(CudaAttention, SparseFromRecordedMassMatchesKeptReference) {
  struct Shape {
    int block, dim;
    DType dtype;
  };
  for (const Shape& shape : {Shape{64, 64, DType::kBF16}, Shape{128, 64, DType::kBF16}, Shape{64, 128, DType::kF16}}) {
    const int block = shape.block;
    Problem p({4, 2, 1300, shape.dim, shape.dtype}, 10 + block + (shape.dim - 64));
    const int prefix = 1200;
    const auto mass = exact_attention_with_tile_mass(p.device(), prefix, block, nullptr).to_host(nullptr);
    const TileSet kept = kernels::select_tiles(mass, 4, 0.6);
    const std::size_t causal_tiles = static_cast<std::size_t>(4) * mass.tiles * (mass.tiles + 1) / 2;
    ASSERT_LT(kept.cols.size(), causal_tiles) << "the test needs dropped tiles";
    p.out.poison();
    sparse_attention(p.device(), DeviceTilePlan(kept, prefix, nullptr), nullptr);
    ok(cudaDeviceSynchronize());
    std::vector<int> rows(prefix);
    for (int i = 0; i < prefix; ++i) rows[i] = i;
    EXPECT_LT(relative_error(p, p.out.download(), rows,
                             [&](int h, int i, int j) { return kept_key(kept, h, i, j); }),
              tolerance(shape.dtype))
        << "block " << block << ", dim " << shape.dim;
  }
}

void expect_same_tiles(const TileSet& device, const TileSet& host, const std::string& what) {
  EXPECT_EQ(device.offsets, host.offsets) << what;
  EXPECT_EQ(device.cols, host.cols) << what;
}

// The device's selection (bisection on the masses' bits) keeps what the
// host's (a heaviest-first walk) keeps, on recorded mass and on masses made
// of ties and zeros.
TEST_F(CudaAttention, DeviceTileSelectionEqualsTheHosts) {
  Problem p({4, 2, 1300, 64, DType::kBF16}, 31);
  const DeviceTileMass recorded = exact_attention_with_tile_mass(p.device(), 1200, 64, nullptr);
  const TileMass host = recorded.to_host(nullptr);
  for (double keep : {0.0, 0.5, 0.9, 0.98, 1.0})
    expect_same_tiles(select_tiles(recorded, keep, nullptr), kernels::select_tiles(host, 4, keep),
                      "recorded, keep " + std::to_string(keep));

  const int heads = 3, tiles = 70;  // more than two words of bits a row
  std::mt19937 rng(5);
  std::uniform_int_distribution<int> level(0, 3);
  TileMass ties{64, tiles, std::vector<float>(static_cast<std::size_t>(heads) * tiles * tiles)};
  for (float& x : ties.mass) x = 0.125f * level(rng);  // many equal masses, a quarter of them zero
  DeviceTileMass uploaded{64, tiles, heads, DeviceBuffer(ties.mass.size() * sizeof(float), nullptr)};
  ok(cudaMemcpy(uploaded.mass.data(), ties.mass.data(), uploaded.mass.bytes(), cudaMemcpyHostToDevice));
  for (double keep : {0.3, 0.7, 1.0})
    expect_same_tiles(select_tiles(uploaded, keep, nullptr), kernels::select_tiles(ties, heads, keep),
                      "ties, keep " + std::to_string(keep));
}

TEST_F(CudaAttention, CopyRowsAnyStrides) {
  const int heads = 3, tokens = 200, dim = 64, rows = 150;
  Tensor src(heads, tokens, dim, DType::kF16), dst(heads, tokens, dim, DType::kF16);
  std::mt19937 rng(11);
  src.fill(rng, 0.0f, 1.0f);
  dst.poison();
  // dst token-major [tokens, heads, dim]: the layout a QKV projection makes.
  const MutableDeviceHeads token_major{dst.device, DType::kF16, heads, tokens, dim, dim,
                                       static_cast<std::ptrdiff_t>(heads) * dim};
  copy_rows(src.view(), token_major, rows, nullptr);
  const auto bits = dst.download_bits();
  const auto want = src.download_bits();
  for (int h = 0; h < heads; ++h)
    for (int t = 0; t < tokens; ++t)
      for (int d = 0; d < dim; ++d) {
        const auto got = bits[(static_cast<std::size_t>(t) * heads + h) * dim + d];
        if (t < rows)
          ASSERT_EQ(got, want[(static_cast<std::size_t>(h) * tokens + t) * dim + d]);
        else
          ASSERT_EQ(got, 0xffff) << "row " << t << " past rows was written";
      }
}

// Head-major on both sides (a head's rows one span): every piece of the
// rows asked for, of every head, and nothing past them, for row counts
// that leave a thread block part-full.
TEST_F(CudaAttention, CopyRowsHeadMajorSpans) {
  for (const int dim : {64, 128})
    for (const int rows : {1, 127, 1000}) {
      const int heads = 3, tokens = 1031;
      Tensor src(heads, tokens, dim, DType::kBF16), dst(heads, tokens, dim, DType::kBF16);
      std::mt19937 rng(rows);
      src.fill(rng, 0.0f, 1.0f);
      dst.poison();
      copy_rows(src.view(), dst.mutable_view(), rows, nullptr);
      const auto got = dst.download_bits(), want = src.download_bits();
      for (std::size_t i = 0; i < got.size(); ++i) {
        const bool copied = static_cast<int>(i / dim % tokens) < rows;
        ASSERT_EQ(got[i], copied ? want[i] : 0xffff) << "dim " << dim << " rows " << rows << " element " << i;
      }
    }
}

template <typename F>
void expect_invalid(F&& call, const std::string& argument) {
  try {
    call();
    FAIL() << "no exception; expected one naming " << argument;
  } catch (const std::invalid_argument& e) {
    EXPECT_EQ(std::string(e.what()).rfind(argument + ":", 0), 0u) << e.what();
  }
}

TEST_F(CudaAttention, BadArgumentsNameTheArgument) {
  Problem p({2, 1, 300, 64, DType::kBF16}, 12);
  std::vector<std::uint16_t> host(p.q.size());
  DeviceProblem on_host = p.device();
  on_host.q.data = host.data();
  expect_invalid([&] { exact_attention(on_host, nullptr); }, "query");
  DeviceProblem odd_dim = p.device();
  odd_dim.q.dim = odd_dim.k.dim = odd_dim.v.dim = odd_dim.out.dim = 32;
  expect_invalid([&] { exact_attention(odd_dim, nullptr); }, "query");
  DeviceProblem mixed = p.device();
  mixed.k.dtype = DType::kF16;
  expect_invalid([&] { exact_attention(mixed, nullptr); }, "key");
  DeviceProblem no_scale = p.device();
  no_scale.scale = 0.0f;
  expect_invalid([&] { exact_attention(no_scale, nullptr); }, "scale");
  Problem gqa({4, 2, 300, 64, DType::kBF16}, 13);
  DeviceProblem broadcast = gqa.device();
  broadcast.k.head_stride = 0;  // both kv heads read head 0's rows (torch's expand())
  expect_invalid([&] { exact_attention(broadcast, nullptr); }, "key");
  expect_invalid([&] { exact_attention_with_tile_mass(p.device(), 200, 32, nullptr); }, "block");
  expect_invalid([&] { exact_attention_with_tile_mass(p.device(), 301, 64, nullptr); }, "prefix");
  expect_invalid([&] { dense_causal_attention_with_tile_mass(p.device(), 200, 96, nullptr); }, "block");
  expect_invalid([&] { dense_causal_attention_with_tile_mass(p.device(), 301, 64, nullptr); }, "prefix");
  expect_invalid([&] { DeviceTilePlan(all_causal_tiles(2, 4, 32), 100, nullptr); }, "kept");
  expect_invalid([&] { DeviceTilePlan(all_causal_tiles(2, 4, 64), 300, nullptr); }, "rows");
}

}  // namespace
}  // namespace attention_echo::kernels::cuda
