// The cuDNN dense miss (cudnn_attention.hpp) against the float64 reference,
// the tile-mass capture (tile_mass_capture.hpp) against the exact mass, and
// the miss route (miss_attention.hpp). Tests of the cuDNN path skip without
// a GPU or in a build without cuDNN; the capture tests need only a GPU.
#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <random>
#include <stdexcept>
#include <string>
#include <vector>

#include "cuda/cuda_fixtures.hpp"
#include "kernels/attention_kernel.hpp"
#include "kernels/cuda/cudnn_attention.hpp"
#include "kernels/cuda/miss_attention.hpp"
#include "kernels/cuda/tile_mass_capture.hpp"

namespace attention_echo::kernels::cuda {
namespace {

using namespace testing;

class Cudnn : public ::testing::Test {
 protected:
  void SetUp() override {
    if (!has_cuda_device()) GTEST_SKIP() << "no CUDA device";
    if (!cudnn_available()) GTEST_SKIP() << "no cuDNN in this build or process";
    static const bool printed = [] {
      std::printf("cuDNN runtime version %d\n", cudnn_version());
      return true;
    }();
    (void)printed;
  }
  // The cuDNN output's error over `rows` (default: all) of a fresh problem.
  double error(const Case& c, unsigned seed, const std::vector<int>* rows = nullptr) {
    Problem p(c, seed);
    EXPECT_TRUE(cudnn_attention(p.device(), nullptr, nullptr)) << "cuDNN refused the problem";
    ok(cudaDeviceSynchronize());
    return relative_error(p, p.out.download(), rows ? *rows : all_rows(p), [](int, int, int) { return true; });
  }
};

class Capture : public ::testing::Test {
 protected:
  void SetUp() override {
    if (!has_cuda_device()) GTEST_SKIP() << "no CUDA device";
  }
};

TEST_F(Cudnn, CausalGqaRaggedLengthBf16) {
  EXPECT_LT(error({8, 2, 1000, 128, DType::kBF16}, 21), tolerance(DType::kBF16));
}

TEST_F(Cudnn, CausalShortRaggedF16) {
  for (int t : {1, 17, 130})
    EXPECT_LT(error({4, 4, t, 64, DType::kF16}, 22 + t), tolerance(DType::kF16)) << "T = " << t;
}

TEST_F(Cudnn, SuffixRowsFromQueryOffset) {
  Case c{4, 2, 1000, 128, DType::kBF16};
  c.query_offset = 700;
  EXPECT_LT(error(c, 23), tolerance(DType::kBF16));
  c.query_offset = 999;  // one row
  EXPECT_LT(error(c, 24), tolerance(DType::kBF16));
}

TEST_F(Cudnn, NonCausalBidirectionalPrefixMqa) {
  Case c{4, 1, 777, 64, DType::kF16};
  c.causal = false;
  c.prefix_length = 300;
  EXPECT_LT(error(c, 25), tolerance(DType::kF16));
  c.query_offset = 200;  // rows in the prefix block and past it
  EXPECT_LT(error(c, 26), tolerance(DType::kF16));
  c.query_offset = 500;  // rows past it only
  EXPECT_LT(error(c, 27), tolerance(DType::kF16));
  c.query_offset = 0;
  c.prefix_length = 777;  // all rows bidirectional
  EXPECT_LT(error(c, 28), tolerance(DType::kF16));
}

TEST_F(Cudnn, LogitsNearOverflow) {
  Case c{4, 2, 600, 128, DType::kBF16};
  c.mean = 8.0f;
  c.sigma = 2.0f;
  EXPECT_LT(error(c, 29), tolerance(DType::kBF16));
}

TEST_F(Cudnn, LongSequence32kGqa) {
  Case c{8, 2, 32768, 128, DType::kBF16};
  const std::vector<int> rows = long_sequence_rows(8, 30);
  EXPECT_LT(error(c, 30, &rows), tolerance(DType::kBF16));
}

// The row log-sum-exp cuDNN writes is log sum_j exp(scale q.k_j), natural log.
// A shape's graphs are built only once its misses have done the work they
// are worth (miss_attention.hpp's policy); with and without the row LSE
// are separate graphs.
TEST_F(Cudnn, GraphsAreBuiltOnceTheirShapeEarnedThem) {
  Problem p({4, 2, 333, 64, DType::kBF16}, 31);  // a shape no other test builds
  const double work = 4.0 * 333 * 333 * 64;     // one causal call: every row over every key
  EXPECT_FALSE(cudnn_graphs_earned(p.device(), false, 2.5 * work));
  EXPECT_FALSE(cudnn_graphs_earned(p.device(), false, 2.5 * work));
  EXPECT_TRUE(cudnn_graphs_earned(p.device(), false, 2.5 * work));
  ASSERT_TRUE(cudnn_attention(p.device(), nullptr, nullptr));
  EXPECT_TRUE(cudnn_graphs_earned(p.device(), false, 1e30));  // built
  EXPECT_FALSE(cudnn_graphs_earned(p.device(), true, 1e30));
  ok(cudaDeviceSynchronize());
}

TEST_F(Cudnn, RowLseIsTheNaturalLogSumExp) {
  Case c{4, 2, 500, 128, DType::kBF16};
  c.query_offset = 100;
  Problem p(c, 31);
  const DeviceBuffer lse(static_cast<std::size_t>(c.heads) * p.q.tokens * sizeof(float));
  ASSERT_TRUE(cudnn_attention(p.device(), static_cast<float*>(lse.data()), nullptr));
  std::vector<float> host(static_cast<std::size_t>(c.heads) * p.q.tokens);
  ok(cudaMemcpy(host.data(), lse.data(), lse.bytes(), cudaMemcpyDeviceToHost));
  double worst = 0.0;
  for (int h = 0; h < c.heads; ++h)
    for (int i : {100, 101, 300, 499}) {
      double sum = 0.0;
      for (int j = 0; j <= i; ++j) {
        double dot = 0.0;
        for (int d = 0; d < c.dim; ++d) dot += static_cast<double>(p.q.at(h, i - 100, d)) * p.k.at(p.kv(h), j, d);
        sum += std::exp(dot * p.scale());
      }
      worst = std::max(worst, std::abs(host[static_cast<std::size_t>(h) * p.q.tokens + i - 100] - std::log(sum)));
    }
  EXPECT_LT(worst, 1e-3);
}

// Our kernel's row LSE is not exposed: the capture's LSE comes from cuDNN
// where it runs, else from a float64 host computation uploaded.
DeviceBuffer row_lse(Problem& p) {
  DeviceBuffer lse(static_cast<std::size_t>(p.c.heads) * p.c.tokens * sizeof(float));
  if (cudnn_available() && cudnn_attention(p.device(), static_cast<float*>(lse.data()), nullptr)) return lse;
  std::vector<float> host(static_cast<std::size_t>(p.c.heads) * p.c.tokens);
  for (int h = 0; h < p.c.heads; ++h)
    for (int i = 0; i < p.c.tokens; ++i) {
      double max = -INFINITY, sum = 0.0;
      std::vector<double> dots(p.key_end(i));
      for (int j = 0; j < p.key_end(i); ++j) {
        double dot = 0.0;
        for (int d = 0; d < p.c.dim; ++d) dot += static_cast<double>(p.q.at(h, i, d)) * p.k.at(p.kv(h), j, d);
        max = std::max(max, dots[j] = dot * p.scale());
      }
      for (double x : dots) sum += std::exp(x - max);
      host[static_cast<std::size_t>(h) * p.c.tokens + i] = static_cast<float>(max + std::log(sum));
    }
  ok(cudaMemcpy(lse.data(), host.data(), lse.bytes(), cudaMemcpyHostToDevice));
  return lse;
}

// The capture with every row equals the exact mass; with samples it equals
// the mass of exactly those rows.
void expect_capture(const Case& c, int prefix, int block, int samples) {
  Problem p(c, 40 + block + samples);
  const DeviceBuffer lse = row_lse(p);
  const auto mass = capture_tile_mass(p.device(), static_cast<const float*>(lse.data()), prefix, block, samples,
                                      nullptr)
                        .to_host(nullptr);
  ASSERT_EQ(mass.tiles, (prefix + block - 1) / block);
  EXPECT_LT(worst_difference(mass.mass, reference_mass(p, prefix, block, samples == block ? 0 : samples)), 1e-3)
      << "block " << block << ", samples " << samples;
}

TEST_F(Capture, CausalEveryRowIsTheExactMass) {
  expect_capture({4, 2, 700, 64, DType::kBF16}, 600, 64, 64);
  expect_capture({4, 2, 700, 128, DType::kBF16}, 700, 128, 128);
  expect_capture({2, 1, 2500, 64, DType::kF16}, 2400, 128, 128);  // keys split over blocks
}

TEST_F(Capture, SampledRowsAreTheirExactMass) {
  expect_capture({4, 2, 700, 128, DType::kBF16}, 690, 128, 16);
  expect_capture({4, 1, 700, 64, DType::kF16}, 650, 128, 8);
  expect_capture({2, 2, 500, 128, DType::kBF16}, 500, 64, 32);
  expect_capture({2, 1, 4600, 64, DType::kF16}, 4500, 64, 8);  // over 64 tiles: the longer key split
  expect_capture({4, 2, 700, 128, DType::kBF16}, 690, 64, 4);   // two query tiles in each half of a warp
  expect_capture({2, 1, 4600, 64, DType::kF16}, 4500, 64, 4);
}

TEST_F(Capture, NonCausalPrefix) {
  Case c{2, 2, 900, 64, DType::kF16};
  c.causal = false;
  c.prefix_length = 500;
  expect_capture(c, 500, 128, 128);
  expect_capture(c, 500, 128, 16);
}

// The selection from sampled mass against the one from the exact mass: the
// share of the exact mass the sampled selection keeps, per (head, query
// tile), on inputs whose attention is uneven (mean-shifted q and k).
void expect_sampled_selection_keeps_mass(int block, int samples) {
  Case c{4, 2, 2048, 128, DType::kBF16};
  c.mean = 0.3f;
  c.sigma = 1.5f;
  Problem p(c, 50);
  const DeviceBuffer lse = row_lse(p);
  const auto* l = static_cast<const float*>(lse.data());
  const TileMass exact = capture_tile_mass(p.device(), l, 2048, block, block, nullptr).to_host(nullptr);
  const TileMass sampled = capture_tile_mass(p.device(), l, 2048, block, samples, nullptr).to_host(nullptr);
  const double keep = 0.9;
  const TileSet from_sampled = select_tiles(sampled, c.heads, keep);
  double worst = 1.0, total_kept = 0.0;
  for (int row = 0; row < c.heads * exact.tiles; ++row) {
    double kept = 0.0, all = 0.0;
    for (int j = 0; j < exact.tiles; ++j) all += exact.mass[static_cast<std::size_t>(row) * exact.tiles + j];
    for (auto i = from_sampled.offsets[row]; i < from_sampled.offsets[row + 1]; ++i)
      kept += exact.mass[static_cast<std::size_t>(row) * exact.tiles + from_sampled.cols[i]];
    worst = std::min(worst, kept / all);
    total_kept += kept / all;
  }
  std::printf("sampled %d/%d selection at keep %.2f: exact mass kept, worst tile row %.4f, mean %.4f\n", samples,
              block, keep, worst, total_kept / (c.heads * exact.tiles));
  EXPECT_GT(worst, keep - 0.1);
}

TEST_F(Capture, SampledSelectionKeepsTheMassItShould) {
  expect_sampled_selection_keeps_mass(128, 16);
  expect_sampled_selection_keeps_mass(128, kMassSamples);
  expect_sampled_selection_keeps_mass(64, kMassSamples);  // the cache's tiles
  // 4 of 64 kept 0.76 of the worst tile row's mass here (H200): why 8 is the default.
}

TEST_F(Capture, MissRouteGivesOutputAndMass) {
  Case c{4, 2, 1000, 128, DType::kBF16};
  Problem p(c, 60);
  const auto mass = miss_attention_with_tile_mass(p.device(), 900, 128, nullptr, 128).to_host(nullptr);
  EXPECT_LT(relative_error(p, p.out.download(), all_rows(p), [](int, int, int) { return true; }),
            tolerance(DType::kBF16));
  EXPECT_LT(worst_difference(mass.mass, reference_mass(p, 900, 128)), 1e-3);
  p.out.poison();
  miss_attention(p.device(), nullptr);
  ok(cudaDeviceSynchronize());
  EXPECT_LT(relative_error(p, p.out.download(), all_rows(p), [](int, int, int) { return true; }),
            tolerance(DType::kBF16));
}

// The route on cuDNN on a caller's stream: cuDNN and the capture come after
// what the stream queued before (here q's upload) and before what it queues
// after (the output's download).
TEST_F(Capture, MissRouteOnCudnnKeepsTheCallersStreamOrder) {
  if (!cudnn_available()) GTEST_SKIP() << "no cuDNN in this build or process";
  Case c{8, 2, 2048, 128, DType::kBF16};
  Problem p(c, 62);
  const DeviceBuffer lse(static_cast<std::size_t>(c.heads) * c.tokens * sizeof(float));
  // The graph with the row LSE built: the route takes cuDNN from here.
  ASSERT_TRUE(cudnn_attention(p.device(), static_cast<float*>(lse.data()), nullptr));
  ok(cudaDeviceSynchronize());
  std::vector<std::uint16_t> q_bits(p.q.size()), out_bits(p.out.size());
  for (std::size_t i = 0; i < q_bits.size(); ++i) q_bits[i] = to_bits(p.q.host[i], c.dtype);
  ok(cudaHostRegister(q_bits.data(), p.q.bytes(), cudaHostRegisterDefault));
  ok(cudaHostRegister(out_bits.data(), p.out.bytes(), cudaHostRegisterDefault));
  cudaStream_t stream = nullptr;
  ok(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
  ok(cudaMemset(p.q.device, 0, p.q.bytes()));  // what a route that ran early would read
  p.out.poison();
  ok(cudaDeviceSynchronize());
  ok(cudaMemcpyAsync(p.q.device, q_bits.data(), p.q.bytes(), cudaMemcpyHostToDevice, stream));
  const TileMass mass = [&] {
    const DeviceTileMass device_mass = miss_attention_with_tile_mass(p.device(), 2048, 128, stream);
    ok(cudaMemcpyAsync(out_bits.data(), p.out.device, p.out.bytes(), cudaMemcpyDeviceToHost, stream));
    return device_mass.to_host(stream);
  }();
  ok(cudaStreamSynchronize(stream));  // the mass's stream-ordered free
  ok(cudaStreamDestroy(stream));
  ok(cudaHostUnregister(q_bits.data()));
  ok(cudaHostUnregister(out_bits.data()));
  std::vector<float> out(out_bits.size());
  for (std::size_t i = 0; i < out.size(); ++i) out[i] = from_bits(out_bits[i], c.dtype);
  const std::vector<int> rows{0, 1, 127, 128, 1000, 2047};
  EXPECT_LT(relative_error(p, out, rows, [](int, int, int) { return true; }), tolerance(DType::kBF16));
  EXPECT_LT(worst_difference(mass.mass, reference_mass(p, 2048, 128, kMassSamples)), 1e-3);
}

TEST_F(Capture, BadArgumentsNameTheArgument) {
  Problem p({2, 1, 300, 64, DType::kBF16}, 61);
  const DeviceBuffer lse(2 * 300 * sizeof(float));
  const auto* l = static_cast<const float*>(lse.data());
  auto expect_invalid = [&](int prefix, int block, int samples, const float* lse_ptr, const std::string& argument) {
    try {
      capture_tile_mass(p.device(), lse_ptr, prefix, block, samples, nullptr);
      ADD_FAILURE() << "no exception; expected one naming " << argument;
    } catch (const std::invalid_argument& e) {
      EXPECT_EQ(std::string(e.what()).rfind(argument + ":", 0), 0u) << e.what();
    }
  };
  expect_invalid(200, 128, 24, l, "samples");
  expect_invalid(200, 64, 128, l, "samples");
  expect_invalid(200, 64, 2, l, "samples");
  expect_invalid(200, 32, 16, l, "block");
  expect_invalid(301, 64, 16, l, "prefix");
  expect_invalid(200, 64, 16, nullptr, "row_lse");
}

}  // namespace
}  // namespace attention_echo::kernels::cuda
