// Snapshot files: "AECHOSNP", u32 version, u64 body size, u64 FNV-1a of the
// body, then the body (little-endian, fixed-width fields): hash_dim, the
// semantic keyer's fingerprint, the entry count, and per entry its lookup
// fields, prefix and one section per tier payload (u8 tier, u64 length, what
// the tier writes). save() writes a temp file of its own, fsyncs it, renames
// it over the target and fsyncs the directory, so a crash at any point
// leaves either the previous snapshot or the new one, never half of one;
// load() parses and checks everything into a fresh store before swapping it
// in, so a bad file leaves the cache as it was.
#include <fcntl.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <stdexcept>
#include <string>
#include <vector>

#include "cache/cache_impl.hpp"
#include "cache/entry_codec.hpp"
#include "core/checksum.hpp"

namespace attention_echo {
namespace {

constexpr char kMagic[8] = {'A', 'E', 'C', 'H', 'O', 'S', 'N', 'P'};
// 2: a section per tier payload instead of fixed exact/sparse/dense fields.
// 3: the semantic keyer's fingerprint after hash_dim.
constexpr std::uint32_t kVersion = 3;

// The key of a fixed probe, hashed: keys stored under another projection
// (seed, generator or pooling) would match nothing they should, so such a
// file is refused rather than loaded.
std::uint64_t keyer_fingerprint(const index::SemanticKeyer& keyer) {
  float probe[2 * 8];
  for (int i = 0; i < 16; ++i) probe[i] = static_cast<float>(i % 5) - 1.5f;
  const std::vector<float> key = keyer.key({probe, 2, 8});
  return fnv1a({reinterpret_cast<const char*>(key.data()), key.size() * sizeof(float)});
}

[[noreturn]] void fail_io(const std::string& path, const std::string& what) {
  throw std::runtime_error("snapshot " + path + ": " + what + ": " + std::strerror(errno));
}

// bytes to `path` durably: a temp file unique to this call beside it
// (concurrent saves do not share one), written and fsynced, renamed over
// path, then the directory fsynced so the rename itself survives a crash.
void write_durably(const std::string& path, std::string_view bytes) {
  static std::atomic<std::uint64_t> serial{0};
  const std::string tmp = path + ".tmp." + std::to_string(::getpid()) + "." + std::to_string(serial++);
  const int fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (fd < 0) fail_io(path, "cannot create " + tmp);
  std::size_t done = 0;
  while (done < bytes.size()) {
    const ssize_t n = ::write(fd, bytes.data() + done, bytes.size() - done);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) break;
    done += static_cast<std::size_t>(n);
  }
  const bool synced = done == bytes.size() && ::fsync(fd) == 0;
  const bool closed = ::close(fd) == 0;
  if (!synced || !closed || ::rename(tmp.c_str(), path.c_str()) != 0) {
    const int error = errno;
    ::unlink(tmp.c_str());
    errno = error;
    fail_io(path, "cannot write " + tmp);
  }
  const std::string dir = std::filesystem::path(path).parent_path().string();
  const int dfd = ::open(dir.empty() ? "." : dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (dfd >= 0) {  // best effort: the file is complete either way
    ::fsync(dfd);
    ::close(dfd);
  }
}

}  // namespace

void cache::write_entry(BinaryWriter& w, const cache::Entry& e, const cache::TierSet& tiers) {
  w.put_string(e.space.name_space);
  for (int field : {e.space.layer, e.space.heads, e.space.kv_heads, e.space.dim}) w.put<std::int32_t>(field);
  w.put<std::uint8_t>(e.space.causal);
  w.put<std::uint64_t>(e.uses);
  w.put_vector(e.key);
  w.put_vector(e.tokens);
  w.put<std::uint64_t>(e.k_fingerprint);
  w.put<std::int32_t>(e.payload->prefix);
  w.put<std::uint32_t>(static_cast<std::uint32_t>(e.payload->parts.size()));
  for (const auto& [kind, part] : e.payload->parts) {
    BinaryWriter section;
    tiers.find(kind)->write(*part, section);
    w.put<std::uint8_t>(static_cast<std::uint8_t>(kind));
    w.put_string(section.bytes());
  }
}

namespace {

// Every size must agree with the shapes it claims: a loaded entry is later
// handed to the kernels unchecked.
void check_entry(const BinaryReader& r, const cache::Entry& e, int hash_dim) {
  const cache::KeySpace& s = e.space;
  const int prefix = e.payload->prefix;
  if (s.heads < 1 || s.kv_heads < 1 || s.dim < 1 || s.heads % s.kv_heads != 0 || prefix < 1)
    r.fail("bad entry shape");
  if (!e.key.empty() && static_cast<int>(e.key.size()) != hash_dim) r.fail("key size != hash_dim");
  if (!e.tokens.empty() && static_cast<int>(e.tokens.size()) != prefix) r.fail("token count != prefix");
}

std::unique_ptr<const cache::TierPayload> read_part(BinaryReader& r, const cache::Entry& e, Tier kind,
                                                    const cache::TierSet& tiers) {
  const cache::ReuseTier* tier = tiers.find(kind);
  if (tier == nullptr || e.payload->find(kind) != nullptr)
    r.fail("unknown or repeated tier " + std::to_string(static_cast<int>(kind)));
  BinaryReader section = r.section(r.get<std::uint64_t>("payload size"), "payload");
  auto part = tier->read(section);
  if (!section.done()) section.fail("trailing bytes in a " + std::string(to_string(kind)) + " payload");
  if (const std::string problem = tier->validate(*part, e.space, e.payload->prefix); !problem.empty())
    r.fail(problem);
  return part;
}

}  // namespace

cache::Entry cache::read_entry(BinaryReader& r, int hash_dim, const cache::TierSet& tiers) {
  cache::Entry e;
  e.space.name_space = r.get_string("namespace");
  e.space.layer = r.get<std::int32_t>("layer");
  e.space.heads = r.get<std::int32_t>("heads");
  e.space.kv_heads = r.get<std::int32_t>("kv heads");
  e.space.dim = r.get<std::int32_t>("dim");
  e.space.causal = r.get<std::uint8_t>("mask") != 0;
  e.uses = r.get<std::uint64_t>("uses");
  e.key = r.get_vector<float>("key");
  e.tokens = r.get_vector<std::int32_t>("tokens");
  e.k_fingerprint = r.get<std::uint64_t>("k fingerprint");
  auto payload = std::make_shared<cache::Payload>();
  payload->prefix = r.get<std::int32_t>("prefix");
  e.payload = payload;
  check_entry(r, e, hash_dim);
  const auto parts = r.get<std::uint32_t>("payload count");
  for (std::uint32_t i = 0; i < parts; ++i) {
    const auto kind = static_cast<Tier>(r.get<std::uint8_t>("tier"));
    payload->parts.emplace_back(kind, read_part(r, e, kind, tiers));
  }
  return e;
}

namespace {

std::string read_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw std::runtime_error("snapshot " + path + ": cannot open");
  return std::string(std::istreambuf_iterator<char>(in), {});
}

}  // namespace

void AttentionEchoCache::save(const std::string& path) const {
  BinaryWriter body;
  {
    std::lock_guard lock(impl_->mutex);
    // Device payloads stay out: a snapshot is host memory, read back into host entries.
    auto entries = impl_->store.entries_by_age();
    std::erase_if(entries, [](const cache::Entry* e) { return !e->on_host(); });
    body.put<std::int32_t>(static_cast<std::int32_t>(impl_->config.hash_dim));
    body.put<std::uint64_t>(keyer_fingerprint(impl_->keyer));
    body.put<std::uint64_t>(entries.size());
    for (const cache::Entry* e : entries) cache::write_entry(body, *e, impl_->tiers);
  }
  BinaryWriter file;
  file.put_raw({kMagic, sizeof kMagic});
  file.put<std::uint32_t>(kVersion);
  file.put<std::uint64_t>(body.bytes().size());
  file.put<std::uint64_t>(fnv1a(body.bytes()));
  file.put_raw(body.bytes());
  write_durably(path, file.bytes());
}

void AttentionEchoCache::load(const std::string& path) {
  const std::string bytes = read_file(path);
  const std::string where = "snapshot " + path + ": corrupt";
  BinaryReader header(bytes, where);
  if (bytes.size() < sizeof kMagic || std::memcmp(bytes.data(), kMagic, sizeof kMagic) != 0)
    header.fail("not an AttentionEcho snapshot");
  header.take(sizeof kMagic, "magic");
  if (const auto version = header.get<std::uint32_t>("version"); version != kVersion)
    header.fail("unsupported version " + std::to_string(version));
  const auto size = header.get<std::uint64_t>("body size");
  const auto checksum = header.get<std::uint64_t>("checksum");
  if (header.remaining() != size) header.fail("size mismatch");
  const std::string_view body = std::string_view(bytes).substr(header.pos());
  if (fnv1a(body) != checksum) header.fail("checksum mismatch");

  BinaryReader r(body, where);
  const int hash_dim = r.get<std::int32_t>("hash_dim");
  if (hash_dim != impl_->config.hash_dim)
    r.fail("hash_dim " + std::to_string(hash_dim) + " != config's " + std::to_string(impl_->config.hash_dim));
  if (r.get<std::uint64_t>("keyer fingerprint") != keyer_fingerprint(impl_->keyer))
    r.fail("semantic keys from another projection (seed or version)");
  const auto count = r.get<std::uint64_t>("entry count");
  std::vector<cache::Entry> entries;
  for (std::uint64_t i = 0; i < count; ++i) entries.push_back(cache::read_entry(r, hash_dim, impl_->tiers));
  if (!r.done()) r.fail("trailing bytes");

  cache::EntryStore fresh(impl_->config.eviction_policy, static_cast<std::size_t>(impl_->config.capacity),
                          static_cast<std::size_t>(impl_->config.max_bytes),
                          static_cast<std::size_t>(impl_->config.device_max_bytes));
  std::map<std::string, std::uint64_t> dropped;  // per namespace
  for (auto& e : entries) {
    const std::string name_space = e.space.name_space;
    const auto drop = [&](const cache::Entry& victim) { ++dropped[victim.space.name_space]; };
    if (fresh.insert(std::move(e), drop) < 0) ++dropped[name_space];
  }
  std::lock_guard lock(impl_->mutex);
  impl_->store = std::move(fresh);
  for (const auto& namespace_dropped : dropped) {
    const std::uint64_t n = namespace_dropped.second;  // (clang 14 cannot capture a structured binding)
    impl_->count(namespace_dropped.first, [n](CacheStats& s) { s.snapshot_dropped += n; });
  }
}

}  // namespace attention_echo
