// Snapshot files: "AECHOSNP", u32 version, u64 body size, u64 FNV-1a of the
// body, then the body (little-endian, fixed-width fields). save() writes a
// temp file and renames it over the target, so a crash never leaves half a
// snapshot; load() parses and checks everything into a fresh store before
// swapping it in, so a bad file leaves the cache as it was.
#include <cstring>
#include <filesystem>
#include <fstream>
#include <stdexcept>
#include <string>

#include "cache/cache_impl.hpp"

namespace attention_echo {
namespace {

constexpr char kMagic[8] = {'A', 'E', 'C', 'H', 'O', 'S', 'N', 'P'};
constexpr std::uint32_t kVersion = 1;

std::uint64_t fnv1a(std::string_view bytes) {
  std::uint64_t h = 0xcbf29ce484222325ULL;
  for (unsigned char c : bytes) h = (h ^ c) * 0x100000001b3ULL;
  return h;
}

class Writer {
 public:
  template <typename T>
  void put(T value) {
    out_.append(reinterpret_cast<const char*>(&value), sizeof value);
  }
  template <typename T>
  void put_vector(const std::vector<T>& values) {
    put<std::uint64_t>(values.size());
    out_.append(reinterpret_cast<const char*>(values.data()), values.size() * sizeof(T));
  }
  void put_string(const std::string& s) {
    put<std::uint64_t>(s.size());
    out_ += s;
  }
  std::string& bytes() { return out_; }

 private:
  std::string out_;
};

class Reader {
 public:
  Reader(std::string_view bytes, const std::string& path) : in_(bytes), path_(path) {}
  template <typename T>
  T get() {
    T value;
    std::memcpy(&value, take(sizeof value), sizeof value);
    return value;
  }
  template <typename T>
  std::vector<T> get_vector() {
    const auto n = get<std::uint64_t>();
    if (n > in_.size() / sizeof(T)) fail("array length past end of file");
    std::vector<T> values(n);
    std::memcpy(values.data(), take(n * sizeof(T)), n * sizeof(T));
    return values;
  }
  std::string get_string() {
    const auto n = get<std::uint64_t>();
    if (n > in_.size()) fail("string length past end of file");
    return std::string(take(n), n);
  }
  bool done() const { return in_.empty(); }
  [[noreturn]] void fail(const std::string& what) const {
    throw std::runtime_error("snapshot " + path_ + ": corrupt (" + what + ")");
  }

 private:
  const char* take(std::size_t n) {
    if (n > in_.size()) fail("truncated");
    const char* p = in_.data();
    in_.remove_prefix(n);
    return p;
  }
  std::string_view in_;
  const std::string& path_;
};

void write_entry(Writer& w, const cache::Entry& e) {
  w.put_string(e.space.name_space);
  for (int field : {e.space.layer, e.space.heads, e.space.kv_heads, e.space.dim}) w.put<std::int32_t>(field);
  w.put<std::uint8_t>(e.space.causal);
  w.put<std::uint64_t>(e.uses);
  w.put_vector(e.key);
  w.put_vector(e.tokens);
  w.put<std::uint64_t>(e.k_fingerprint);
  const cache::Payload& p = *e.payload;
  w.put<std::int32_t>(p.prefix);
  w.put_vector(p.exact_rows);
  w.put<std::uint8_t>(p.tiles.has_value());
  if (p.tiles) {
    for (int field : {p.tiles->block, p.tiles->tiles, p.tiles->heads}) w.put<std::int32_t>(field);
    w.put_vector(p.tiles->offsets);
    w.put_vector(p.tiles->cols);
  }
  w.put<std::uint8_t>(p.dense.has_value());
  if (p.dense) {
    for (int field : {p.dense->heads, p.dense->prefix, p.dense->dim}) w.put<std::int32_t>(field);
    w.put<std::uint8_t>(p.dense->causal);
    w.put_vector(p.dense->logits);
    w.put_vector(p.dense->mean_query);
  }
}

// Every size must agree with the shapes it claims: a loaded entry is later
// handed to the kernels unchecked.
void check_entry(const Reader& r, const cache::Entry& e, int hash_dim) {
  const cache::KeySpace& s = e.space;
  const cache::Payload& p = *e.payload;
  if (s.heads < 1 || s.kv_heads < 1 || s.dim < 1 || s.heads % s.kv_heads != 0 || p.prefix < 1)
    r.fail("bad entry shape");
  if (!e.key.empty() && static_cast<int>(e.key.size()) != hash_dim) r.fail("key size != hash_dim");
  if (!e.tokens.empty() && static_cast<int>(e.tokens.size()) != p.prefix) r.fail("token count != prefix");
  const auto rows = static_cast<std::size_t>(s.heads) * p.prefix * s.dim;
  if (!p.exact_rows.empty() && p.exact_rows.size() != rows) r.fail("exact rows size");
  if (p.tiles) {
    const kernels::TileSet& t = *p.tiles;
    if (t.heads != s.heads || t.tiles != (p.prefix + t.block - 1) / t.block || (t.block != 32 && t.block != 64))
      r.fail("tile set shape");
    if (t.offsets.size() != static_cast<std::size_t>(t.heads) * t.tiles + 1 || t.offsets.front() != 0 ||
        t.offsets.back() != t.cols.size())
      r.fail("tile offsets");
    for (std::size_t i = 1; i < t.offsets.size(); ++i)
      if (t.offsets[i] < t.offsets[i - 1]) r.fail("tile offsets not ascending");
    for (auto c : t.cols)
      if (c >= t.tiles) r.fail("tile index out of range");
  }
  if (p.dense) {
    const kernels::DenseLogits& d = *p.dense;
    if (d.heads != s.heads || d.prefix != p.prefix || d.dim != s.dim || d.causal != s.causal ||
        d.logits.size() != d.head_size() * d.heads || d.mean_query.size() != static_cast<std::size_t>(d.heads) * d.dim)
      r.fail("dense payload shape");
  }
}

cache::Entry read_entry(Reader& r, int hash_dim) {
  cache::Entry e;
  e.space.name_space = r.get_string();
  e.space.layer = r.get<std::int32_t>();
  e.space.heads = r.get<std::int32_t>();
  e.space.kv_heads = r.get<std::int32_t>();
  e.space.dim = r.get<std::int32_t>();
  e.space.causal = r.get<std::uint8_t>() != 0;
  e.uses = r.get<std::uint64_t>();
  e.key = r.get_vector<float>();
  e.tokens = r.get_vector<std::int32_t>();
  e.k_fingerprint = r.get<std::uint64_t>();
  auto p = std::make_shared<cache::Payload>();
  p->prefix = r.get<std::int32_t>();
  p->exact_rows = r.get_vector<float>();
  if (r.get<std::uint8_t>()) {
    kernels::TileSet t;
    t.block = r.get<std::int32_t>();
    t.tiles = r.get<std::int32_t>();
    t.heads = r.get<std::int32_t>();
    t.offsets = r.get_vector<std::uint32_t>();
    t.cols = r.get_vector<std::uint16_t>();
    p->tiles = std::move(t);
  }
  if (r.get<std::uint8_t>()) {
    kernels::DenseLogits d;
    d.heads = r.get<std::int32_t>();
    d.prefix = r.get<std::int32_t>();
    d.dim = r.get<std::int32_t>();
    d.causal = r.get<std::uint8_t>() != 0;
    d.logits = r.get_vector<float>();
    d.mean_query = r.get_vector<float>();
    p->dense = std::move(d);
  }
  e.payload = std::move(p);
  check_entry(r, e, hash_dim);
  return e;
}

std::string read_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw std::runtime_error("snapshot " + path + ": cannot open");
  return std::string(std::istreambuf_iterator<char>(in), {});
}

}  // namespace

void AttentionEchoCache::save(const std::string& path) const {
  Writer body;
  {
    std::lock_guard lock(impl_->mutex);
    const auto entries = impl_->store.entries_by_age();
    body.put<std::int32_t>(static_cast<std::int32_t>(impl_->config.hash_dim));
    body.put<std::uint64_t>(entries.size());
    for (const cache::Entry* e : entries) write_entry(body, *e);
  }
  Writer file;
  file.bytes().append(kMagic, sizeof kMagic);
  file.put<std::uint32_t>(kVersion);
  file.put<std::uint64_t>(body.bytes().size());
  file.put<std::uint64_t>(fnv1a(body.bytes()));
  file.bytes() += body.bytes();

  const std::string tmp = path + ".tmp";
  {
    std::ofstream out(tmp, std::ios::binary | std::ios::trunc);
    out.write(file.bytes().data(), static_cast<std::streamsize>(file.bytes().size()));
    if (!out.flush()) throw std::runtime_error("snapshot " + path + ": write failed");
  }
  std::filesystem::rename(tmp, path);
}

void AttentionEchoCache::load(const std::string& path) {
  const std::string bytes = read_file(path);
  Reader header(bytes, path);
  if (bytes.size() < sizeof kMagic || std::memcmp(bytes.data(), kMagic, sizeof kMagic) != 0)
    header.fail("not an AttentionEcho snapshot");
  header.get<std::uint64_t>();  // the magic, checked above
  if (const auto version = header.get<std::uint32_t>(); version != kVersion)
    header.fail("unsupported version " + std::to_string(version));
  const auto size = header.get<std::uint64_t>();
  const auto checksum = header.get<std::uint64_t>();
  const std::size_t body_at = sizeof kMagic + 4 + 8 + 8;
  if (bytes.size() - body_at != size) header.fail("size mismatch");
  const std::string_view body(bytes.data() + body_at, size);
  if (fnv1a(body) != checksum) header.fail("checksum mismatch");

  Reader r(body, path);
  const int hash_dim = r.get<std::int32_t>();
  if (hash_dim != impl_->config.hash_dim)
    r.fail("hash_dim " + std::to_string(hash_dim) + " != config's " + std::to_string(impl_->config.hash_dim));
  const auto count = r.get<std::uint64_t>();
  std::vector<cache::Entry> entries;
  for (std::uint64_t i = 0; i < count; ++i) entries.push_back(read_entry(r, hash_dim));
  if (!r.done()) r.fail("trailing bytes");

  cache::EntryStore fresh(impl_->config.eviction_policy, static_cast<std::size_t>(impl_->config.capacity),
                          static_cast<std::size_t>(impl_->config.max_bytes));
  for (auto& e : entries) fresh.insert(std::move(e));
  std::lock_guard lock(impl_->mutex);
  impl_->store = std::move(fresh);
}

}  // namespace attention_echo
