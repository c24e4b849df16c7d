// AttentionEchoCache on CUDA views (the CUDA backend): payloads in device
// memory, the k fingerprint and the guard on the device, bad input refused
// before any state changes. Built only with -DAE_CUDA=ON; every test skips
// when no CUDA device is present.
#include <gtest/gtest.h>

#include <cmath>
#include <stdexcept>
#include <string>
#include <vector>

#include "attention_echo/attention.hpp"
#include "attention_echo/cache.hpp"
#include "cache_fixtures.hpp"
#include "cuda/cuda_fixtures.hpp"
#include "kernels/cpu_backend.hpp"

namespace attention_echo::kernels::cuda {
namespace {

using namespace testing;
using attention_echo::testing::make_qkv;
using attention_echo::testing::Qkv;

constexpr int kHeads = 8, kKvHeads = 2, kDim = 128;

// A Qkv's values rounded to bf16 on the device, the rounded values on the host.
struct DeviceQkv {
  Tensor q, k, v, out;
  explicit DeviceQkv(const Qkv& x)
      : q(x.heads, x.tokens, x.dim, DType::kBF16),
        k(x.kv_heads, x.tokens, x.dim, DType::kBF16),
        v(x.kv_heads, x.tokens, x.dim, DType::kBF16),
        out(x.heads, x.tokens, x.dim, DType::kBF16) {
    q.upload(x.q);
    k.upload(x.k);
    v.upload(x.v);
    out.poison();
  }

  // ||out - exact|| / ||exact|| over every row, exact from the host kernel
  // on the same rounded inputs.
  double error() const {
    std::vector<float> exact(q.size());
    ThreadPool pool(2);
    attention(HeadsView::contiguous(q.host.data(), q.heads, q.tokens, q.dim),
              HeadsView::contiguous(k.host.data(), k.heads, k.tokens, k.dim),
              HeadsView::contiguous(v.host.data(), v.heads, v.tokens, v.dim),
              MutableHeadsView::contiguous(exact.data(), q.heads, q.tokens, q.dim), {}, pool);
    const std::vector<float> got = out.download();
    double diff = 0.0, norm = 0.0;
    for (std::size_t i = 0; i < exact.size(); ++i) {
      diff += (got[i] - exact[i]) * (got[i] - exact[i]);
      norm += double(exact[i]) * exact[i];
    }
    return std::sqrt(diff / norm);
  }
};

EchoConfig config() {
  EchoConfig c;
  c.capacity = 16;
  c.max_prefix_length = 4096;
  c.block_size = 64;
  return c;
}

class CudaCache : public ::testing::Test {
 protected:
  void SetUp() override {
    if (!has_cuda_device()) GTEST_SKIP() << "no CUDA device";
  }

  // A call on d's views with x's embeddings (and tokens when `tokens`).
  EchoResult call(AttentionEchoCache& cache, DeviceQkv& d, const Qkv& x, int prefix, bool tokens,
                  void* stream = nullptr) {
    EchoRequest r;
    r.prefix_length = prefix;
    r.prefix_embeddings = x.embeddings(prefix);
    if (tokens) r.prefix_tokens = std::span<const std::int32_t>(x.tokens_ids).first(prefix);
    r.stream = stream;
    const EchoResult result = cache.attention_with_echo(d.q.view(), d.k.view(), d.v.view(), d.out.mutable_view(), r);
    ok(cudaDeviceSynchronize());
    return result;
  }
};

TEST_F(CudaCache, MissThenExactHitCopiesTheStoredRowsBitForBit) {
  const Qkv x = make_qkv(kHeads, kKvHeads, 640, kDim, 1);
  DeviceQkv d(x);
  AttentionEchoCache cache(config());
  EXPECT_EQ(call(cache, d, x, 512, true).tier, Tier::kNone);
  EXPECT_LT(d.error(), tolerance(DType::kBF16));
  const auto miss = d.out.download_bits();
  d.out.poison();
  const EchoResult hit = call(cache, d, x, 512, true);
  EXPECT_EQ(hit.tier, Tier::kExact);
  EXPECT_EQ(hit.tokens_echoed, 512);
  EXPECT_EQ(d.out.download_bits(), miss);  // stored rows copied, suffix recomputed identically
  const CacheStats s = cache.stats();
  EXPECT_EQ(s.hits_exact, 1u);
  // The exact payload (bf16 rows) and the sparse plan are device bytes.
  EXPECT_GE(s.bytes, std::size_t{kHeads} * 512 * kDim * 2);
}

TEST_F(CudaCache, OtherKeysUnderTheSameTokensMiss) {
  const Qkv x = make_qkv(kHeads, kKvHeads, 256, kDim, 2);
  Qkv other_k = x;
  other_k.k[5 * kDim + 3] += 1.0f;  // one element of one prefix row
  DeviceQkv d(x), e(other_k);
  EXPECT_NE(k_fingerprint(d.k.view(), 256, nullptr), k_fingerprint(e.k.view(), 256, nullptr));
  EXPECT_EQ(k_fingerprint(d.k.view(), 256, nullptr), k_fingerprint(d.k.view(), 256, nullptr));
  AttentionEchoCache cache(config());
  call(cache, d, x, 256, true);
  EXPECT_NE(call(cache, e, other_k, 256, true).tier, Tier::kExact);
  EXPECT_LT(e.error(), tolerance(DType::kBF16));
}

// With either tile edge CUDA takes (128: the one whose capture is cheap).
TEST_F(CudaCache, SimilarPrefixIsServedSparseWithinTheGuard) {
  const Qkv x = make_qkv(kHeads, kKvHeads, 1024, kDim, 3), y = make_qkv(kHeads, kKvHeads, 1024, kDim, 3, 0.02f);
  for (int block : {64, 128}) {
    DeviceQkv dx(x), dy(y);
    EchoConfig c = config();
    c.block_size = block;
    AttentionEchoCache cache(c);
    EXPECT_EQ(call(cache, dx, x, 1024, false).tier, Tier::kNone);
    const EchoResult hit = call(cache, dy, y, 1024, false);
    ASSERT_EQ(hit.tier, Tier::kSparse) << "block " << block;
    EXPECT_LT(hit.kept_fraction, 0.5) << "block " << block;  // a sink and a band: few tiles
    EXPECT_GT(hit.estimated_error, 0.0);
    EXPECT_LT(hit.estimated_error, c.max_error);
    EXPECT_LT(dy.error(), c.max_error);
  }
}

TEST_F(CudaCache, GuardRefusesWhatItCannotVouchForAndRecomputes) {
  const Qkv x = make_qkv(kHeads, kKvHeads, 1024, kDim, 4), y = make_qkv(kHeads, kKvHeads, 1024, kDim, 4, 0.02f);
  DeviceQkv dx(x), dy(y);
  EchoConfig c = config();
  c.max_error = 1e-6;  // below bf16's own rounding
  AttentionEchoCache cache(c);
  call(cache, dx, x, 1024, false);
  const EchoResult r = call(cache, dy, y, 1024, false);
  EXPECT_TRUE(r.rejected);
  EXPECT_EQ(r.tier, Tier::kNone);
  EXPECT_LT(dy.error(), tolerance(DType::kBF16));
  EXPECT_EQ(cache.stats().rejected, 1u);
}

// The device guard measures what the host guard measures on the same values.
TEST_F(CudaCache, DeviceGuardAgreesWithTheHostGuard) {
  Problem p({8, 2, 1500, 128, DType::kBF16, false, 1200}, 21);
  p.out.upload(std::vector<float>(p.out.size(), 0.25f));  // anything: the guard measures it
  std::vector<float> out = p.out.host;
  const std::vector<int> rows = {0, 7, 300, 1199, 1210, 1499};
  const double device = max_row_error(p.device(), rows, nullptr);
  ThreadPool pool(2);
  const AttentionProblem host{HeadsView::contiguous(p.q.host.data(), 8, 1500, 128),
                              HeadsView::contiguous(p.k.host.data(), 2, 1500, 128),
                              HeadsView::contiguous(p.v.host.data(), 2, 1500, 128),
                              MutableHeadsView::contiguous(out.data(), 8, 1500, 128),
                              p.scale(), false, 1200};
  const double expected = CpuBackend(pool).max_row_error(host, rows);
  EXPECT_GT(expected, 0.1);
  EXPECT_NEAR(device, expected, 1e-4 * expected);
}

TEST_F(CudaCache, BadInputThrowsNamingTheArgumentAndChangesNothing) {
  const Qkv x = make_qkv(kHeads, kKvHeads, 128, kDim, 5);
  DeviceQkv d(x);
  AttentionEchoCache cache(config());
  EchoRequest r;
  r.prefix_length = 64;
  r.prefix_embeddings = x.embeddings(64);
  auto expect_invalid = [&](const std::string& name, const AnyHeadsView& q, const AnyHeadsView& k,
                            AttentionEchoCache& c) {
    try {
      c.attention_with_echo(q, k, d.v.view(), d.out.mutable_view(), r);
      ADD_FAILURE() << "no throw for " << name;
    } catch (const std::invalid_argument& e) {
      EXPECT_EQ(std::string(e.what()).rfind(name + ":", 0), 0u) << e.what();
    }
    EXPECT_EQ(c.stats().lookups, 0u);
    EXPECT_EQ(c.size(), 0u);
  };
  AnyHeadsView host_memory = d.q.view();
  host_memory.data = x.q.data();  // says cuda:0, is host memory
  expect_invalid("query", host_memory, d.k.view(), cache);
  AnyHeadsView f16_key = d.k.view();
  f16_key.dtype = DType::kF16;
  expect_invalid("key", d.q.view(), f16_key, cache);
  AnyHeadsView missing_device = d.q.view();
  missing_device.device = Device::cuda(64);
  expect_invalid("key", missing_device, d.k.view(), cache);  // key is on another device than query
  try {
    AnyHeadsView k = d.k.view(), v = d.v.view();
    MutableAnyHeadsView out = d.out.mutable_view();
    k.device = v.device = out.device = missing_device.device;
    cache.attention_with_echo(missing_device, k, v, out, r);
    ADD_FAILURE() << "no throw for a device the machine does not have";
  } catch (const std::invalid_argument& e) {
    EXPECT_EQ(std::string(e.what()).rfind("query:", 0), 0u) << e.what();
  }
  EchoConfig dense = config();
  dense.mode = EchoMode::kDense;
  AttentionEchoCache dense_cache(dense);
  expect_invalid("mode", d.q.view(), d.k.view(), dense_cache);
  EchoConfig small_blocks = config();
  small_blocks.block_size = 32;
  AttentionEchoCache small_cache(small_blocks);
  expect_invalid("block_size", d.q.view(), d.k.view(), small_cache);
}

TEST_F(CudaCache, DeviceBudgetEvictsOnItsDeviceAndSkipsWhatCannotFit) {
  const Qkv x = make_qkv(kHeads, kKvHeads, 512, kDim, 6), y = make_qkv(kHeads, kKvHeads, 512, kDim, 7);
  DeviceQkv dx(x), dy(y);
  EchoConfig c = config();
  c.mode = EchoMode::kOff;
  c.device_max_bytes = std::size_t{kHeads} * 512 * kDim * 2 + 1;  // one entry's rows
  AttentionEchoCache cache(c);
  call(cache, dx, x, 512, true);
  call(cache, dy, y, 512, true);
  EXPECT_EQ(cache.stats().evictions, 1u);
  EXPECT_EQ(call(cache, dy, y, 512, true).tier, Tier::kExact);
  c.device_max_bytes = 1000;
  AttentionEchoCache tiny(c);
  call(tiny, dx, x, 512, true);
  EXPECT_EQ(tiny.stats().oversize_skipped, 1u);
  EXPECT_EQ(tiny.size(), 0u);
}

// A hit on another stream waits for the miss's writes (the entry's fence).
TEST_F(CudaCache, AHitOnAnotherStreamReadsWhatTheMissWrote) {
  const Qkv x = make_qkv(kHeads, kKvHeads, 2048, kDim, 8);
  DeviceQkv d(x), again(x);
  cudaStream_t first, second;
  ok(cudaStreamCreateWithFlags(&first, cudaStreamNonBlocking));
  ok(cudaStreamCreateWithFlags(&second, cudaStreamNonBlocking));
  AttentionEchoCache cache(config());
  EchoRequest r;
  r.prefix_length = 2048;
  r.prefix_embeddings = x.embeddings(2048);
  r.prefix_tokens = x.tokens_ids;
  r.stream = first;
  cache.attention_with_echo(d.q.view(), d.k.view(), d.v.view(), d.out.mutable_view(), r);
  r.stream = second;  // no synchronisation in between
  EXPECT_EQ(cache.attention_with_echo(again.q.view(), again.k.view(), again.v.view(), again.out.mutable_view(), r).tier,
            Tier::kExact);
  ok(cudaDeviceSynchronize());
  EXPECT_EQ(again.out.download_bits(), d.out.download_bits());
  cudaStreamDestroy(first);
  cudaStreamDestroy(second);
}

}  // namespace
}  // namespace attention_echo::kernels::cuda
