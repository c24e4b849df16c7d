#include "serving/kv_block_store.hpp"

#include <algorithm>
#include <bit>
#include <cmath>
#include <list>
#include <map>
#include <stdexcept>
#include <string>

#include "attention_echo/tensor.hpp"
#include "index/semantic_index.hpp"

namespace attention_echo::serving {
namespace {

std::uint64_t mix(std::uint64_t h, std::uint64_t word) {
  h ^= word + 0x9e3779b97f4a7c15ULL + (h << 6) + (h >> 2);
  h *= 0xff51afd7ed558ccdULL;
  return h ^ (h >> 33);
}

std::uint64_t namespace_root(std::string_view name_space) {
  std::uint64_t h = 0xcbf29ce484222325ULL;
  for (unsigned char c : name_space) h = (h ^ c) * 0x100000001b3ULL;
  return mix(h, name_space.size());
}

// The chain hash of a block: its parent's hash, then its tokens. A partial
// (tail) block hashes its token count too, so it never equals a full block.
std::uint64_t chain(std::uint64_t parent, std::span<const int> tokens) {
  std::uint64_t h = mix(parent, tokens.size());
  for (int t : tokens) h = mix(h, static_cast<std::uint32_t>(t));
  return h;
}

// The branch index finds, among a node's children, those sharing the
// request's next tokens without scanning them all (with 64-token blocks a
// node can have thousands of children, and scanning them cost 30 us a
// lookup at 1e4 stored prompts): a child is listed under its first g tokens
// for g = 1 and every multiple of 16 below the block size that it has. The
// child sharing the most tokens is in the deepest list that exists for the
// request, so the match stays token-granular.
constexpr int kBranchStep = 16;

// (g, key) for every branch depth g <= tokens.size() below block_tokens.
std::vector<std::pair<int, std::uint64_t>> branch_keys(std::uint64_t parent, std::span<const int> tokens,
                                                       int block_tokens) {
  std::vector<std::pair<int, std::uint64_t>> keys;
  std::uint64_t h = mix(parent, 0x62726e6368ULL);  // "brnch": apart from chain()'s hashes
  const int n = std::min<int>(static_cast<int>(tokens.size()), block_tokens - 1);
  for (int g = 1; g <= n; ++g) {
    h = mix(h, static_cast<std::uint32_t>(tokens[g - 1]));
    if (g == 1 || g % kBranchStep == 0) keys.emplace_back(g, h);
  }
  return keys;
}

}  // namespace

std::vector<float> token_profile(std::span<const int> tokens, int dim) {
  if (dim <= 0) throw std::invalid_argument("dim: must be positive");
  std::vector<float> key(dim, 0.0f);
  // h % dim as a mask where dim is a power of two (kProfileDim): a 64-bit
  // division per trigram was a quarter of the profile's time, which the
  // planner pays on every lookup.
  const std::uint64_t mask = std::has_single_bit(static_cast<unsigned>(dim)) ? dim - 1 : 0;
  for (std::size_t i = 2; i < tokens.size(); ++i) {
    const std::uint64_t h = mix(mix(mix(0, static_cast<std::uint32_t>(tokens[i - 2])),
                                    static_cast<std::uint32_t>(tokens[i - 1])),
                                static_cast<std::uint32_t>(tokens[i]));
    key[mask ? h & mask : h % static_cast<std::uint64_t>(dim)] += (h >> 63) ? 1.0f : -1.0f;
  }
  double norm = 0.0;
  for (float x : key) norm += double(x) * x;
  if (norm > 0.0)
    for (float& x : key) x = static_cast<float>(x / std::sqrt(norm));
  return key;
}

// One block in the chain. refs: records whose block list includes it; a
// node goes when the last such record is evicted (children first, since a
// child's records are a subset of its parent's). approximate, error: from
// the forward that stored it (a blend, and its guard's estimate).
struct KVBlockStore::Node {
  Block block;
  bool approximate = false;
  double error = 0.0;
  std::vector<int> tokens;
  std::uint64_t parent = 0;
  int refs = 0;
  std::uint64_t owner = 0;  // the record that last stored it (touched on a hit)
};

struct KVBlockStore::Impl {
  struct StoredRecord {
    Record record;
    std::vector<std::uint64_t> chain;  // node hashes, first block first
    std::size_t bytes = 0;             // tokens, plus blocks it was first to store
  };
  std::unordered_map<std::uint64_t, Node> nodes;
  // branch key -> children (a node's address is stable until it is erased,
  // and it is unlinked first)
  std::unordered_map<std::uint64_t, std::vector<const Node*>> branches;
  std::list<StoredRecord> lru;  // most recent first
  std::unordered_map<std::uint64_t, std::list<StoredRecord>::iterator> by_id;
  std::map<std::string, index::SemanticIndex, std::less<>> donors;  // exact records per namespace
  std::size_t bytes = 0;
  std::uint64_t next_id = 1;

  void link(const Node& node, int block_tokens) {
    for (const auto& [g, key] : branch_keys(node.parent, node.tokens, block_tokens)) branches[key].push_back(&node);
  }
  void unlink(const Node& node, int block_tokens) {
    for (const auto& [g, key] : branch_keys(node.parent, node.tokens, block_tokens)) {
      auto it = branches.find(key);
      std::erase(it->second, &node);
      if (it->second.empty()) branches.erase(it);
    }
  }

  // Walks (and extends) the record's chain of blocks: a block already
  // stored is shared, a fresh one is kv's own page (also where it replaces
  // an approximate block with an exact one). Adds the fresh blocks' bytes
  // to stored.bytes; returns the bytes of every block the record uses,
  // shared or not. Changes nothing in the store.
  std::size_t chain_blocks(StoredRecord& stored, const llama::KVState& kv, int block_tokens) const {
    Record& rec = stored.record;
    const std::span<const int> tokens = rec.tokens;
    std::size_t total = stored.bytes;
    std::uint64_t parent = namespace_root(rec.name_space);
    for (int t0 = 0; t0 < static_cast<int>(tokens.size()); t0 += block_tokens) {
      const auto part = tokens.subspan(t0, std::min<std::size_t>(block_tokens, tokens.size() - t0));
      const std::uint64_t h = chain(parent, part);
      const auto it = nodes.find(h);
      const bool replace = it != nodes.end() && it->second.approximate && !rec.approximate;
      if (it == nodes.end() || replace) {
        rec.blocks.push_back(kv.pages[t0 / block_tokens]);
        if (!replace) stored.bytes += rec.blocks.back()->data.size() * sizeof(float) + part.size() * sizeof(int);
      } else {
        rec.blocks.push_back(it->second.block);
      }
      total += rec.blocks.back()->data.size() * sizeof(float) + part.size() * sizeof(int);
      stored.chain.push_back(h);
      parent = h;
    }
    return total;
  }

  // Links a chained record's nodes (nothing here can throw but
  // allocation), registers an exact one as a donor and puts it first in
  // the LRU order; the caller evicts past the budget.
  void commit(StoredRecord stored, double error, int block_tokens) {
    Record& rec = stored.record;
    std::uint64_t parent = namespace_root(rec.name_space);
    for (std::size_t b = 0; b < stored.chain.size(); ++b) {
      const std::uint64_t h = stored.chain[b];
      auto [it, added] = nodes.try_emplace(h);
      Node& node = it->second;
      if (added) {
        const std::size_t t0 = b * block_tokens, t1 = std::min(t0 + block_tokens, rec.tokens.size());
        node.tokens.assign(rec.tokens.begin() + t0, rec.tokens.begin() + t1);
        node.parent = parent;
        link(node, block_tokens);
      }
      if (added || (node.approximate && !rec.approximate)) {
        node.block = rec.blocks[b];
        node.approximate = rec.approximate;
        node.error = error;
      }
      ++node.refs;
      parent = h;
    }
    rec.id = next_id++;
    for (const std::uint64_t h : stored.chain) nodes.at(h).owner = rec.id;
    if (!rec.approximate) {
      auto d = donors.find(rec.name_space);
      if (d == donors.end()) d = donors.emplace(rec.name_space, index::SemanticIndex(kProfileDim)).first;
      d->second.add(rec.id, token_profile(rec.tokens));
    }
    bytes += stored.bytes;
    lru.push_front(std::move(stored));
    by_id[lru.front().record.id] = lru.begin();
  }

  // Removes a record, and the blocks no other record uses (children first:
  // a child's records are a subset of its parent's).
  void remove(std::list<StoredRecord>::iterator it, int block_tokens) {
    for (auto h = it->chain.rbegin(); h != it->chain.rend(); ++h) {
      Node& node = nodes.at(*h);
      if (--node.refs > 0) continue;
      bytes -= node.block->data.size() * sizeof(float) + node.tokens.size() * sizeof(int);
      unlink(node, block_tokens);
      nodes.erase(*h);
    }
    bytes -= it->record.tokens.size() * sizeof(int) + it->record.anchors.bytes();
    if (auto d = donors.find(it->record.name_space); d != donors.end()) d->second.remove(it->record.id);
    by_id.erase(it->record.id);
    lru.erase(it);
  }
};

KVBlockStore::KVBlockStore(Shape shape, std::size_t max_bytes)
    : shape_(shape), max_bytes_(max_bytes), impl_(std::make_unique<Impl>()) {
  if (shape.layers <= 0) throw std::invalid_argument("shape.layers: must be positive");
  if (shape.kv_dim <= 0) throw std::invalid_argument("shape.kv_dim: must be positive");
  if (shape.block_tokens <= 0 || shape.block_tokens % kKeyChunk != 0)
    throw std::invalid_argument("shape.block_tokens: must be a positive multiple of " + std::to_string(kKeyChunk) +
                                " (the engine's page size)");
  pages_ = std::make_shared<llama::KVPagePool>(std::size_t{2} * shape.layers * shape.block_tokens * shape.kv_dim);
}

void KVBlockStore::reserve(std::size_t bytes) {
  if (bytes > max_bytes_) throw std::invalid_argument("bytes: more than the store's budget");
  pages_->reserve(bytes / (pages_->page_floats() * sizeof(float)));
}

llama::KVState KVBlockStore::state(std::span<const Block> blocks, int rows) const {
  if (rows < 0 || rows > static_cast<int>(blocks.size()) * shape_.block_tokens)
    throw std::invalid_argument("rows: must be in [0, the blocks' rows]");
  llama::KVState kv;
  kv.length = rows;
  kv.page_tokens = shape_.block_tokens;
  kv.layers = shape_.layers;
  kv.kv_dim = shape_.kv_dim;
  kv.pool = pages_;
  kv.pages.assign(blocks.begin(), blocks.begin() + (rows + shape_.block_tokens - 1) / shape_.block_tokens);
  return kv;
}

KVBlockStore::~KVBlockStore() = default;
KVBlockStore::KVBlockStore(KVBlockStore&&) noexcept = default;
KVBlockStore& KVBlockStore::operator=(KVBlockStore&&) noexcept = default;

std::vector<std::uint64_t> KVBlockStore::block_hashes(std::string_view name_space,
                                                      std::span<const int> tokens) const {
  const std::size_t B = shape_.block_tokens;
  std::vector<std::uint64_t> hashes;
  std::uint64_t at = namespace_root(name_space);
  for (std::size_t t0 = 0; t0 + B <= tokens.size(); t0 += B) hashes.push_back(at = chain(at, tokens.subspan(t0, B)));
  return hashes;
}

KVBlockStore::Prefix KVBlockStore::longest_prefix(std::string_view name_space, std::span<const int> tokens,
                                                  bool exact_only) {
  Impl& m = *impl_;
  const int B = shape_.block_tokens, T = static_cast<int>(tokens.size());
  const std::uint64_t root = namespace_root(name_space);
  Prefix out;
  std::uint64_t at = root, owner = 0;
  auto use = [&](const Node& node, int rows) {
    out.blocks.push_back(node.block);
    out.length += rows;
    out.approximate |= node.approximate;
    out.error = std::max(out.error, node.error);
    owner = node.owner;
  };
  // Full blocks by hash, then the best partial match among the children.
  while (out.length + B <= T) {
    const std::uint64_t h = chain(at, tokens.subspan(out.length, B));
    const auto it = m.nodes.find(h);
    if (it == m.nodes.end() || (exact_only && it->second.approximate) ||
        !std::equal(it->second.tokens.begin(), it->second.tokens.end(), tokens.begin() + out.length))
      break;
    use(it->second, B);
    at = h;
  }
  const auto rest = tokens.subspan(out.length);
  const Node* best = nullptr;
  int best_rows = 0;
  const std::vector<const Node*>* children = nullptr;
  const auto keys = branch_keys(at, rest, B);
  for (auto k = keys.rbegin(); k != keys.rend() && children == nullptr; ++k)
    if (const auto it = m.branches.find(k->second); it != m.branches.end()) children = &it->second;
  // The candidates are cold: fetch their tokens together, not one miss after another.
  if (children)
    for (const Node* n : *children) __builtin_prefetch(n->tokens.data());
  for (std::size_t c = 0; children && c < children->size(); ++c) {
    const Node& n = *(*children)[c];
    if (exact_only && n.approximate) continue;
    const std::size_t limit = std::min(n.tokens.size(), rest.size());
    const int rows = static_cast<int>(std::mismatch(n.tokens.begin(), n.tokens.begin() + limit, rest.begin()).first -
                                      n.tokens.begin());
    if (rows > best_rows) best = &n, best_rows = rows;
  }
  if (best) use(*best, best_rows);
  if (owner) touch(owner);
  return out;
}

bool KVBlockStore::insert(std::string_view name_space, std::span<const int> tokens, const llama::KVState& kv,
                          bool approximate, double error) {
  const int B = shape_.block_tokens;
  if (tokens.empty()) throw std::invalid_argument("tokens: empty");
  if (kv.length < static_cast<int>(tokens.size()) || kv.pages.size() * B < tokens.size())
    throw std::invalid_argument("kv: fewer rows than tokens");
  if (kv.page_tokens != B || kv.layers != shape_.layers || kv.kv_dim != shape_.kv_dim)
    throw std::invalid_argument("kv: pages of another shape than the store's blocks");
  Impl::StoredRecord stored;
  Record& rec = stored.record;
  rec.name_space = std::string(name_space);
  rec.tokens.assign(tokens.begin(), tokens.end());
  rec.approximate = approximate;
  if (!approximate) rec.anchors = index_anchors(tokens);
  stored.bytes = tokens.size() * sizeof(int) + rec.anchors.bytes();
  if (impl_->chain_blocks(stored, kv, B) > max_bytes_) return false;
  impl_->commit(std::move(stored), error, B);
  while (impl_->bytes > max_bytes_ && impl_->lru.size() > 1) {
    impl_->remove(std::prev(impl_->lru.end()), B);
    ++evictions_;
  }
  return true;
}

std::vector<KVBlockStore::Similar> KVBlockStore::similar(std::string_view name_space, std::span<const int> tokens,
                                                         int count, float min_similarity) const {
  std::vector<Similar> out;
  const auto donors = impl_->donors.find(name_space);
  if (donors == impl_->donors.end() || donors->second.size() == 0) return out;
  for (const index::Candidate& c : donors->second.search(token_profile(tokens), count, min_similarity))
    out.push_back({&impl_->by_id.at(c.id)->record, c.similarity});
  return out;
}

void KVBlockStore::touch(std::uint64_t id) {
  const auto it = impl_->by_id.find(id);
  if (it != impl_->by_id.end()) impl_->lru.splice(impl_->lru.begin(), impl_->lru, it->second);
}

std::size_t KVBlockStore::size() const { return impl_->lru.size(); }
std::size_t KVBlockStore::bytes() const { return impl_->bytes; }

void KVBlockStore::clear() {
  const std::uint64_t next = impl_->next_id;
  impl_ = std::make_unique<Impl>();
  impl_->next_id = next;
}

void KVBlockStore::clear(std::string_view name_space) {
  Impl& m = *impl_;
  for (auto it = m.lru.begin(); it != m.lru.end();) {
    const auto next = std::next(it);
    if (it->record.name_space == name_space) m.remove(it, shape_.block_tokens);
    it = next;
  }
}

}  // namespace attention_echo::serving
