// The snapshot loader. The first byte picks what the rest is: a snapshot
// body, which this target wraps in a valid header (magic, version, size,
// checksum) so the fuzzer explores the parser past the checksum, or a whole
// file (header checks). load() must throw std::runtime_error or succeed;
// after a success the loaded entries are served (exact, sparse and dense
// lookups of the shape the seed corpus uses), so a payload that passed
// validation but disagrees with its shape reads out of bounds (ASan).
#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

#include "attention_echo/cache.hpp"
#include "fuzz_input_file.hpp"

namespace ae = attention_echo;

namespace {

constexpr std::uint32_t kVersion = 3;  // src/cache/snapshot.cpp
constexpr int kH = 2, kHkv = 1, kT = 24, kD = 8, kP = 16, kE = 8;

std::uint64_t fnv1a(const std::uint8_t* data, std::size_t size) {
  std::uint64_t h = 0xcbf29ce484222325ULL;
  for (std::size_t i = 0; i < size; ++i) h = (h ^ data[i]) * 0x100000001b3ULL;
  return h;
}

std::vector<std::uint8_t> with_header(const std::uint8_t* body, std::size_t size) {
  std::vector<std::uint8_t> file = {'A', 'E', 'C', 'H', 'O', 'S', 'N', 'P'};
  auto put = [&](auto value) {
    const auto* p = reinterpret_cast<const std::uint8_t*>(&value);
    file.insert(file.end(), p, p + sizeof value);
  };
  put(kVersion);
  put(static_cast<std::uint64_t>(size));
  put(fnv1a(body, size));
  file.insert(file.end(), body, body + size);
  return file;
}

void serve(ae::AttentionEchoCache& cache) {
  std::vector<float> q(kH * kT * kD), k(kHkv * kT * kD), v(k.size()), out(q.size()), emb(kP * kE);
  for (std::size_t i = 0; i < q.size(); ++i) q[i] = static_cast<float>(i % 7) / 7.0f;
  for (std::size_t i = 0; i < k.size(); ++i) k[i] = v[i] = static_cast<float>(i % 5) / 5.0f;
  for (std::size_t i = 0; i < emb.size(); ++i) emb[i] = static_cast<float>(i % kE) - 3.5f;
  std::vector<std::int32_t> tokens(kP);
  for (int t = 0; t < kP; ++t) tokens[t] = t;
  for (bool by_tokens : {true, false}) {
    ae::EchoRequest r;
    r.prefix_length = kP;
    r.prefix_embeddings = {emb.data(), kP, kE};
    if (by_tokens) r.prefix_tokens = tokens;
    cache.attention_with_echo(ae::HeadsView::contiguous(q.data(), kH, kT, kD),
                              ae::HeadsView::contiguous(k.data(), kHkv, kT, kD),
                              ae::HeadsView::contiguous(v.data(), kHkv, kT, kD),
                              ae::MutableHeadsView::contiguous(out.data(), kH, kT, kD), r);
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  if (size == 0) return 0;
  const std::vector<std::uint8_t> file =
      data[0] & 1 ? std::vector<std::uint8_t>(data + 1, data + size) : with_header(data + 1, size - 1);
  const std::string& path = ae::fuzzing::write_input(file.data(), file.size());
  for (ae::EchoMode mode : {ae::EchoMode::kSparse, ae::EchoMode::kDense}) {
    ae::EchoConfig config;
    config.threads = 1;
    config.block_size = 32;
    config.mode = mode;
    ae::AttentionEchoCache cache(config);
    try {
      cache.load(path);
    } catch (const std::runtime_error&) {
      return 0;  // refused, naming the file
    }
    serve(cache);
  }
  return 0;
}
