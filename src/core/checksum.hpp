// The one checksum of the library's binary formats: snapshots and the
// values of the shared L2 store. FNV-1a, 64 bits: catches truncation and
// bit flips, not an adversary (the store is trusted infrastructure).
#pragma once

#include <cstdint>
#include <string_view>

namespace attention_echo {

inline std::uint64_t fnv1a(std::string_view bytes) {
  std::uint64_t h = 0xcbf29ce484222325ULL;
  for (unsigned char c : bytes) h = (h ^ c) * 0x100000001b3ULL;
  return h;
}

}  // namespace attention_echo
