// Little-endian, fixed-width writer for cache snapshots and the shared L2
// store's values: the mirror of BinaryReader (core/binary_reader.hpp),
// field for field.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>
#include <type_traits>
#include <vector>

namespace attention_echo {

class BinaryWriter {
 public:
  template <typename T>
  void put(T value) {
    static_assert(std::is_trivially_copyable_v<T>);
    out_.append(reinterpret_cast<const char*>(&value), sizeof value);
  }
  // A u64 count, then the values (BinaryReader::get_vector).
  template <typename T>
  void put_vector(const std::vector<T>& values) {
    put<std::uint64_t>(values.size());
    out_.append(reinterpret_cast<const char*>(values.data()), values.size() * sizeof(T));
  }
  // A u64 length, then the bytes (BinaryReader::get_string, or section).
  void put_string(std::string_view s) {
    put<std::uint64_t>(s.size());
    out_ += s;
  }
  void put_raw(std::string_view bytes) { out_ += bytes; }
  const std::string& bytes() const { return out_; }

 private:
  std::string out_;
};

}  // namespace attention_echo
