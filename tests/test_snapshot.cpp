// Snapshots: a round trip keeps every entry and its counters; a truncated,
// bit-flipped or foreign file is refused with an error naming the file and
// leaves the cache exactly as it was; a process killed while saving leaves
// the previous snapshot loadable and complete.
#include <gtest/gtest.h>
#include <signal.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstdint>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <initializer_list>
#include <limits>
#include <string>
#include <vector>

#include "attention_echo/cache.hpp"
#include "cache_fixtures.hpp"

namespace attention_echo {
namespace {

using testing::call;
using testing::make_qkv;
using testing::Qkv;
using testing::request_for;

constexpr int kH = 2, kHkv = 1, kT = 96, kD = 32, kP = 64;  // small: fast under sanitizers
// Header: magic, u32 version, u64 body size, u64 checksum; the body starts
// with i32 hash_dim and u64 keyer fingerprint (snapshot.cpp).
constexpr std::size_t kVersionAt = 8, kBodyAt = 28, kFingerprintAt = kBodyAt + 4;

EchoConfig config_for(EchoMode mode, long long hash_dim = 128) {
  EchoConfig c;
  c.mode = mode;
  c.block_size = 32;
  c.threads = 1;  // no worker threads: the crash test forks
  c.max_error = 0.1;
  c.hash_dim = hash_dim;
  return c;
}

// Unique per process: ctest runs the tests of this file in parallel.
std::string temp_path(const std::string& name) {
  return ::testing::TempDir() + "/ae_snap_" + std::to_string(getpid()) + "_" + name;
}

std::string read_bytes(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(in), {});
}

void write_bytes(const std::string& path, const std::string& bytes) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out << bytes;
}

// The header's checksum recomputed over the (edited) body, so a test can
// forge a well-formed file that differs in one field only.
void fix_checksum(std::string& bytes) {
  std::uint64_t h = 0xcbf29ce484222325ULL;
  for (std::size_t i = kBodyAt; i < bytes.size(); ++i) h = (h ^ static_cast<unsigned char>(bytes[i])) * 0x100000001b3ULL;
  std::memcpy(bytes.data() + 20, &h, sizeof h);
}

// A cache with entries of every tier in two namespaces, some used twice.
void fill(AttentionEchoCache& cache, unsigned seed = 1) {
  for (unsigned i = 0; i < 3; ++i) {
    Qkv x = make_qkv(kH, kHkv, kT, kD, seed + i);
    EchoRequest r = request_for(x, kP, i != 1);
    r.name_space = i == 2 ? "tenant-b" : "tenant-a";
    call(cache, x, r);
    if (i == 0) call(cache, x, r);  // uses = 2
  }
}

// What "the cache as it was" means: its entries (their snapshot, byte for
// byte) and its stats, cache-wide and per namespace.
struct State {
  std::string entries;
  CacheStats stats;
  std::vector<std::string> namespaces;
  std::vector<CacheStats> per_namespace;
};

State state_of(const AttentionEchoCache& cache) {
  const std::string path = temp_path("state.bin");
  cache.save(path);
  State s{read_bytes(path), cache.stats(), cache.namespaces(), {}};
  for (const std::string& ns : s.namespaces) s.per_namespace.push_back(cache.stats(ns));
  std::remove(path.c_str());
  return s;
}

void expect_same_stats(const CacheStats& a, const CacheStats& b) {
  EXPECT_EQ(a.lookups, b.lookups);
  EXPECT_EQ(a.hits(), b.hits());
  EXPECT_EQ(a.misses, b.misses);
  EXPECT_EQ(a.evictions, b.evictions);
  EXPECT_EQ(a.entries, b.entries);
  EXPECT_EQ(a.bytes, b.bytes);
  EXPECT_EQ(a.snapshot_dropped, b.snapshot_dropped);
  EXPECT_EQ(a.tokens_echoed, b.tokens_echoed);
}

void expect_same_state(const State& a, const State& b) {
  EXPECT_TRUE(a.entries == b.entries) << "entries changed";
  expect_same_stats(a.stats, b.stats);
  ASSERT_EQ(a.namespaces, b.namespaces);
  for (std::size_t i = 0; i < a.per_namespace.size(); ++i) expect_same_stats(a.per_namespace[i], b.per_namespace[i]);
}

// load(path) throws std::runtime_error naming the file and mentioning
// `why`, and the cache is as it was.
void expect_refused(AttentionEchoCache& cache, const std::string& path, const std::string& why) {
  const State before = state_of(cache);
  try {
    cache.load(path);
    ADD_FAILURE() << "loaded a bad snapshot (" << why << ")";
  } catch (const std::runtime_error& e) {
    EXPECT_NE(std::string(e.what()).find(path), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find(why), std::string::npos) << e.what();
  }
  expect_same_state(state_of(cache), before);
}

TEST(Snapshot, RoundTripKeepsEveryEntryAndItsCounters) {
  for (EchoMode mode : {EchoMode::kOff, EchoMode::kSparse, EchoMode::kDense}) {
    SCOPED_TRACE(std::string(to_string(mode)));
    AttentionEchoCache cache(config_for(mode));
    fill(cache);
    const std::string path = temp_path("round_trip.bin");
    cache.save(path);
    AttentionEchoCache restored(config_for(mode));
    restored.load(path);
    // Same entries, lookup fields, payloads and use counts: the restored
    // cache saves the same bytes.
    EXPECT_TRUE(state_of(restored).entries == read_bytes(path));
    EXPECT_EQ(restored.size(), cache.size());
    EXPECT_EQ(restored.namespaces(), cache.namespaces());
    for (const std::string& ns : cache.namespaces()) {
      EXPECT_EQ(restored.stats(ns).entries, cache.stats(ns).entries);
      EXPECT_EQ(restored.stats(ns).bytes, cache.stats(ns).bytes);
    }
    EXPECT_EQ(restored.stats().lookups, 0u);  // counters are the process's, not the file's
    std::remove(path.c_str());
  }
}

TEST(Snapshot, TruncatedFilesAreRefusedAndChangeNothing) {
  AttentionEchoCache source(config_for(EchoMode::kSparse));
  fill(source);
  const std::string good = temp_path("good.bin");
  source.save(good);
  const std::string bytes = read_bytes(good);
  AttentionEchoCache cache(config_for(EchoMode::kSparse));
  fill(cache, 11);  // other entries, which must survive
  const std::string bad = temp_path("truncated.bin");
  for (std::size_t length : {std::size_t{0}, std::size_t{7}, std::size_t{27}, kBodyAt, kBodyAt + 20,
                             bytes.size() / 2, bytes.size() - 1}) {
    SCOPED_TRACE(length);
    write_bytes(bad, bytes.substr(0, length));
    expect_refused(cache, bad, length < 8 ? "not an AttentionEcho snapshot" : "");
  }
  std::remove(good.c_str());
  std::remove(bad.c_str());
}

TEST(Snapshot, BitFlipsAnywhereAreRefusedAndChangeNothing) {
  AttentionEchoCache source(config_for(EchoMode::kDense));
  fill(source);
  const std::string good = temp_path("good_flip.bin");
  source.save(good);
  const std::string bytes = read_bytes(good);
  AttentionEchoCache cache(config_for(EchoMode::kDense));
  fill(cache, 21);
  const std::string bad = temp_path("flipped.bin");
  // Every header byte, then positions spread over the body.
  std::vector<std::size_t> at;
  for (std::size_t i = 0; i < kBodyAt + 12; ++i) at.push_back(i);
  for (std::size_t i = kBodyAt + 12; i < bytes.size(); i += bytes.size() / 41) at.push_back(i);
  at.push_back(bytes.size() - 1);
  for (std::size_t i : at) {
    SCOPED_TRACE(i);
    std::string flipped = bytes;
    flipped[i] ^= static_cast<char>(1u << (i % 8));
    write_bytes(bad, flipped);
    expect_refused(cache, bad, "");
  }
  std::remove(good.c_str());
  std::remove(bad.c_str());
}

TEST(Snapshot, ForeignFilesAreRefusedNamingWhatDiffers) {
  AttentionEchoCache source(config_for(EchoMode::kSparse));
  fill(source);
  const std::string good = temp_path("foreign_src.bin");
  source.save(good);
  const std::string bytes = read_bytes(good);
  const std::string bad = temp_path("foreign.bin");

  AttentionEchoCache other_dim(config_for(EchoMode::kSparse, 64));
  fill(other_dim);
  expect_refused(other_dim, good, "hash_dim 128 != config's 64");

  AttentionEchoCache cache(config_for(EchoMode::kSparse));
  fill(cache, 31);
  std::string other_projection = bytes;  // keys made by another projection
  other_projection[kFingerprintAt] ^= 0x01;
  fix_checksum(other_projection);
  write_bytes(bad, other_projection);
  expect_refused(cache, bad, "another projection");

  std::string older = bytes;  // another format version
  older[kVersionAt] = 2;
  write_bytes(bad, older);
  expect_refused(cache, bad, "unsupported version 2");

  write_bytes(bad, "AECHOSNQ and then something else entirely");
  expect_refused(cache, bad, "not an AttentionEcho snapshot");
  expect_refused(cache, temp_path("does_not_exist.bin"), "cannot open");
  std::remove(good.c_str());
  std::remove(bad.c_str());
}

// Where a snapshot of one sparse entry (namespace "", a key, no tokens)
// holds two i32 fields. Body: hash_dim, fingerprint, count; the entry:
// namespace, 4 shape ints, mask, uses, key (128 floats), tokens (none),
// k fingerprint, prefix, payload count; the payload: tier, section length,
// then its tile block.
constexpr std::size_t kSparsePrefixAt = kBodyAt + 20 + 8 + 16 + 1 + 8 + (8 + 128 * 4) + 8 + 8;
constexpr std::size_t kSparseTileBlockAt = kSparsePrefixAt + 4 + 4 + 1 + 8;

// Saves such a snapshot, checks that the i32 at `at` is `saved` (the layout
// above is right), and requires each of `bad` written there (under a valid
// checksum) to be refused for `why`.
void expect_sparse_field_refused(std::size_t at, std::int32_t saved, std::initializer_list<std::int32_t> bad,
                                 const std::string& why) {
  AttentionEchoCache source(config_for(EchoMode::kSparse));
  Qkv x = make_qkv(kH, kHkv, kT, kD, 5);
  call(source, x, request_for(x, kP));
  const std::string path = temp_path("sparse_field.bin");
  source.save(path);
  std::string bytes = read_bytes(path);
  std::int32_t field = 0;
  std::memcpy(&field, bytes.data() + at, 4);
  ASSERT_EQ(field, saved);
  for (std::int32_t value : bad) {
    std::memcpy(bytes.data() + at, &value, 4);
    fix_checksum(bytes);
    write_bytes(path, bytes);
    AttentionEchoCache cache(config_for(EchoMode::kSparse));
    expect_refused(cache, path, why);
  }
  std::remove(path.c_str());
}

// Found by fuzz_snapshot: a sparse payload whose tile block is 0 (under a
// valid checksum) divided by zero in validation. Any block but 32 or 64 is
// refused.
TEST(Snapshot, ASparsePayloadWithABadTileBlockIsRefused) {
  expect_sparse_field_refused(kSparseTileBlockAt, 32, {0, -1, 33, std::numeric_limits<std::int32_t>::max()},
                              "tile set shape");
}

// Found by fuzz_snapshot: a prefix near INT_MAX made the tile count
// overflow before the shape check refused it (UBSan stops this test
// without the fix).
TEST(Snapshot, ASparsePayloadUnderAHugePrefixIsRefused) {
  expect_sparse_field_refused(kSparsePrefixAt, kP, {std::numeric_limits<std::int32_t>::max()}, "tile set shape");
}

// Entries record their head shape and, for the exact tier, a fingerprint
// of the keys: a snapshot of another model loads, and never serves it.
TEST(Snapshot, EntriesOfAnotherModelOrShapeNeverServe) {
  AttentionEchoCache source(config_for(EchoMode::kSparse));
  Qkv x = make_qkv(kH, kHkv, kT, kD, 5);
  call(source, x, request_for(x, kP, true));
  const std::string path = temp_path("other_model.bin");
  source.save(path);
  AttentionEchoCache cache(config_for(EchoMode::kSparse));
  cache.load(path);
  Qkv other_shape = make_qkv(2 * kH, kHkv, kT, kD, 5);  // same prefix, more heads
  EXPECT_EQ(call(cache, other_shape, request_for(other_shape, kP, true)).tier, Tier::kNone);
  Qkv other_weights = make_qkv(kH, kHkv, kT, kD, 5, 0.3f);  // same tokens, other keys
  EXPECT_NE(call(cache, other_weights, request_for(other_weights, kP, true)).tier, Tier::kExact);
  std::remove(path.c_str());
}

// Runs save(path) in a child process that dies mid-write: by SIGXFSZ once
// the temp file reaches `limit` bytes (deterministic), or by SIGKILL from
// here as soon as the temp file appears (limit 0). Returns the signal.
int crash_while_saving(const AttentionEchoCache& cache, const std::string& path, rlim_t limit) {
  const pid_t child = fork();
  if (child == 0) {
    const rlimit no_core{0, 0}, file_size{limit, limit};
    setrlimit(RLIMIT_CORE, &no_core);
    if (limit > 0) setrlimit(RLIMIT_FSIZE, &file_size);
    for (;;) cache.save(path);  // until killed
  }
  if (limit == 0) {
    const std::string dir = std::filesystem::path(path).parent_path();
    const std::string stem = std::filesystem::path(path).filename().string() + ".tmp.";
    int status = 0;
    for (bool seen = false; !seen;) {
      if (waitpid(child, &status, WNOHANG) == child) return 0;  // died on its own: a failure
      for (const auto& f : std::filesystem::directory_iterator(dir))
        if (f.path().filename().string().rfind(stem, 0) == 0) seen = true;
    }
    kill(child, SIGKILL);
  }
  int status = 0;
  waitpid(child, &status, 0);
  return WIFSIGNALED(status) ? WTERMSIG(status) : 0;
}

void remove_temp_files(const std::string& path) {
  const std::string stem = std::filesystem::path(path).filename().string() + ".tmp.";
  for (const auto& f : std::filesystem::directory_iterator(std::filesystem::path(path).parent_path()))
    if (f.path().filename().string().rfind(stem, 0) == 0) std::filesystem::remove(f.path());
}

TEST(Snapshot, ACrashWhileSavingLeavesThePreviousSnapshotLoadable) {
  AttentionEchoCache cache(config_for(EchoMode::kSparse));
  Qkv x = make_qkv(kH, kHkv, kT, kD, 3);
  call(cache, x, request_for(x, kP, true));
  const std::string path = temp_path("crash.bin");
  cache.save(path);
  const std::string previous = read_bytes(path);
  fill(cache, 51);  // the snapshot being written holds more than the previous

  // Killed by the file-size limit halfway through the temp file.
  EXPECT_EQ(crash_while_saving(cache, path, previous.size() / 2), SIGXFSZ);
  EXPECT_TRUE(read_bytes(path) == previous);
  AttentionEchoCache restored(config_for(EchoMode::kSparse));
  restored.load(path);
  EXPECT_EQ(restored.size(), 1u);
  EXPECT_EQ(call(restored, x, request_for(x, kP, true)).tier, Tier::kExact);

  // SIGKILL at an arbitrary point of a save: the file is the previous
  // snapshot or a complete new one, never part of one.
  EXPECT_EQ(crash_while_saving(cache, path, 0), SIGKILL);
  AttentionEchoCache after_kill(config_for(EchoMode::kSparse));
  after_kill.load(path);
  EXPECT_TRUE(after_kill.size() == 1u || after_kill.size() == cache.size()) << after_kill.size();
  remove_temp_files(path);
  std::remove(path.c_str());
}

}  // namespace
}  // namespace attention_echo
