#include "serving/kv_l2.hpp"

#include <algorithm>
#include <stdexcept>

#include "core/binary_reader.hpp"
#include "core/binary_writer.hpp"
#include "core/checksum.hpp"
#include "core/l2_key.hpp"

namespace attention_echo::serving {

KVBlocksL2::KVBlocksL2(std::shared_ptr<L2Store> store, std::uint64_t model_fingerprint, KVBlockStore::Shape shape)
    : store_(std::move(store)),
      shape_(shape),
      prefix_(std::string("ae:") + std::to_string(kL2Format) + ":kv:" + hex64(model_fingerprint) + ":") {}

std::string KVBlocksL2::key_of(std::string_view name_space, std::uint64_t hash) const {
  std::string k = prefix_;
  k += escape_key_part(name_space);
  k += ':';
  k += std::to_string(shape_.layers);
  k += '.';
  k += std::to_string(shape_.kv_dim);
  k += '.';
  k += std::to_string(shape_.block_tokens);
  k += ':';
  k += hex64(hash);
  return k;
}

std::vector<Block> KVBlocksL2::fetch(std::string_view name_space, std::span<const int> tokens,
                                     std::span<const std::uint64_t> hashes, int first) const {
  std::vector<std::string> keys;
  for (std::size_t b = first; b < hashes.size(); ++b) keys.push_back(key_of(name_space, hashes[b]));
  std::vector<Block> blocks;
  if (keys.empty()) return blocks;
  const auto values = store_->get(keys);
  const std::size_t B = shape_.block_tokens;
  for (std::size_t i = 0; i < values.size() && values[i]; ++i) {
    auto block = decode(*values[i], keys[i], tokens.subspan((first + i) * B, B));
    if (!block) {
      store_->reject();
      break;
    }
    blocks.push_back(std::move(block));
  }
  return blocks;
}

Block KVBlocksL2::decode(const std::string& bytes, const std::string& key, std::span<const int> tokens) const {
  try {
    BinaryReader header(bytes, "L2 value " + key);
    if (header.get<std::uint32_t>("format") != kL2Format) return nullptr;
    const auto checksum = header.get<std::uint64_t>("checksum");
    const std::string_view body_bytes = std::string_view(bytes).substr(header.pos());
    if (fnv1a(body_bytes) != checksum) return nullptr;
    BinaryReader body(body_bytes, "L2 value " + key);
    if (body.get_string("key") != key) return nullptr;
    const int layers = body.get<std::int32_t>("layers"), kv_dim = body.get<std::int32_t>("kv_dim"),
              block_tokens = body.get<std::int32_t>("block_tokens");
    if (layers != shape_.layers || kv_dim != shape_.kv_dim || block_tokens != shape_.block_tokens) return nullptr;
    if (!std::ranges::equal(body.get_vector<std::int32_t>("tokens"), tokens)) return nullptr;
    auto block = std::make_shared<llama::KVPage>();
    block->data = body.get_vector<float>("k/v");
    if (!body.done() || block->data.size() != std::size_t{2} * layers * block_tokens * kv_dim) return nullptr;
    return block;
  } catch (const std::runtime_error&) {  // truncated
    return nullptr;
  }
}

void KVBlocksL2::put(std::string_view name_space, std::span<const int> tokens, std::span<const std::uint64_t> hashes,
                     int first, const llama::KVState& kv) const {
  const std::size_t B = shape_.block_tokens;
  if (kv.page_tokens != shape_.block_tokens) throw std::invalid_argument("kv: pages of another size than the blocks");
  std::vector<L2Write> writes;
  for (std::size_t b = first; b < hashes.size() && (b + 1) * B <= static_cast<std::size_t>(kv.length); ++b) {
    const std::string key = key_of(name_space, hashes[b]);
    BinaryWriter body;
    body.put_string(key);
    for (int field : {shape_.layers, shape_.kv_dim, shape_.block_tokens}) body.put<std::int32_t>(field);
    body.put_vector(std::vector<std::int32_t>(tokens.begin() + b * B, tokens.begin() + (b + 1) * B));
    body.put_vector(kv.pages[b]->data);  // a page is a block
    BinaryWriter value;
    value.put<std::uint32_t>(kL2Format);
    value.put<std::uint64_t>(fnv1a(body.bytes()));
    value.put_raw(body.bytes());
    writes.push_back({key, value.bytes()});
  }
  store_->put(writes);
}

}  // namespace attention_echo::serving
