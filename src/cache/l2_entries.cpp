#include "cache/l2_entries.hpp"

#include <algorithm>
#include <stdexcept>

#include "core/binary_writer.hpp"
#include "cache/entry_codec.hpp"
#include "core/checksum.hpp"
#include "core/l2_key.hpp"

namespace attention_echo::cache {
namespace {

template <typename T>
std::uint64_t hash_of(std::span<const T> values) {
  return fnv1a({reinterpret_cast<const char*>(values.data()), values.size_bytes()});
}

std::uint64_t config_fingerprint(const EchoConfig& c) {
  BinaryWriter w;
  w.put<std::int64_t>(c.hash_dim);
  w.put<std::int32_t>(static_cast<std::int32_t>(c.mode));
  w.put<std::int64_t>(c.block_size);
  w.put<double>(c.sparse_mass);
  return fnv1a(w.bytes());
}

}  // namespace

L2Entries::L2Entries(std::shared_ptr<L2Store> store, const EchoConfig& config, const TierSet& tiers)
    : store_(std::move(store)),
      tiers_(tiers),
      hash_dim_(static_cast<int>(config.hash_dim)),
      prefix_(std::string("ae:") + std::to_string(kL2Format) + ":cache:" + hex64(config_fingerprint(config)) + ":") {}

bool L2Entries::covers(const Call& call, Match match) {
  return match == Match::kTokens ? !call.tokens.empty() : call.tokens.empty() && !call.key.empty();
}

std::string L2Entries::key_of(const KeySpace& s, std::span<const std::int32_t> tokens,
                              std::span<const float> key) const {
  std::string k = prefix_;
  k += escape_key_part(s.name_space);
  k += ':';
  k += std::to_string(s.heads);
  k += '.';
  k += std::to_string(s.kv_heads);
  k += '.';
  k += std::to_string(s.dim);
  k += s.causal ? ":causal:" : ":full:";
  k += s.layer < 0 ? std::string("any") : std::to_string(s.layer);
  k += tokens.empty() ? ":s" : ":t";
  k += hex64(tokens.empty() ? hash_of(key) : hash_of(tokens));
  return k;
}

L2Write L2Entries::encode(const Entry& e) const {
  L2Write v{key_of(e.space, e.tokens, e.key), {}};
  BinaryWriter body;
  body.put_string(v.key);
  write_entry(body, e, tiers_);
  BinaryWriter value;
  value.put<std::uint32_t>(kL2Format);
  value.put<std::uint64_t>(fnv1a(body.bytes()));
  value.put_raw(body.bytes());
  v.value = value.bytes();
  return v;
}

std::optional<Entry> L2Entries::fetch(const Call& call) const {
  const std::string key = key_of(call.space, call.tokens, call.key);
  const auto values = store_->get({&key, 1});
  if (!values[0]) return std::nullopt;
  auto entry = decode(*values[0], key, call);
  if (!entry) store_->reject();
  return entry;
}

std::optional<Entry> L2Entries::decode(const std::string& bytes, const std::string& key, const Call& call) const {
  try {
    BinaryReader header(bytes, "L2 value " + key);
    if (header.get<std::uint32_t>("format") != kL2Format) return std::nullopt;
    const auto checksum = header.get<std::uint64_t>("checksum");
    const std::string_view body_bytes = std::string_view(bytes).substr(header.pos());
    if (fnv1a(body_bytes) != checksum) return std::nullopt;
    BinaryReader body(body_bytes, "L2 value " + key);
    if (body.get_string("key") != key) return std::nullopt;  // a value copied under another key
    Entry e = read_entry(body, hash_dim_, tiers_);
    if (!body.done() || e.space != call.space) return std::nullopt;
    const bool same = call.tokens.empty()
                          ? e.tokens.empty() && e.key == call.key
                          : std::ranges::equal(e.tokens, call.tokens) && e.k_fingerprint == call.k_fingerprint;
    if (!same) return std::nullopt;
    return e;
  } catch (const std::runtime_error&) {  // read_entry: a short, lying or invalid section
    return std::nullopt;
  }
}

}  // namespace attention_echo::cache
