// Pieces of the shared L2 store's keys, common to the cache's entries
// (cache/l2_entries.cpp) and the planner's K/V blocks (serving/kv_l2.cpp);
// the layout is in the README, "Shared store (Redis)".
#pragma once

#include <cstdint>
#include <cstdio>
#include <string>
#include <string_view>

namespace attention_echo {

// The layout of keys and values; a new one gets new keys, so old values
// are never read (the server's LRU ages them out).
constexpr std::uint32_t kL2Format = 1;

inline std::string hex64(std::uint64_t h) {
  char text[17];
  std::snprintf(text, sizeof text, "%016llx", static_cast<unsigned long long>(h));
  return text;
}

// A namespace as a key part: ':' (the separator), '%', spaces and bytes
// outside printable ASCII are written %XX, so keys stay readable to SCAN and
// two namespaces never share a key.
inline std::string escape_key_part(std::string_view part) {
  std::string out;
  for (unsigned char c : part) {
    if (c > ' ' && c < 0x7f && c != ':' && c != '%') {
      out += static_cast<char>(c);
    } else {
      char hex[4];
      std::snprintf(hex, sizeof hex, "%%%02X", c);
      out += hex;
    }
  }
  return out;
}

}  // namespace attention_echo
