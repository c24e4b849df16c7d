// Bounds-checked little-endian reader over a file's bytes, for every binary
// format the library parses (model checkpoints, cache snapshots). Every size
// is checked against what is left before a byte is copied, so a truncated or
// lying file is a std::runtime_error naming the file, never a read past the
// end.
#pragma once

#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>
#include <string_view>
#include <type_traits>
#include <vector>

namespace attention_echo {

class BinaryReader {
 public:
  // `where` starts every error message: the file, and what it is if that
  // helps ("snapshot a.bin: corrupt"). bytes must outlive the reader.
  BinaryReader(std::string_view bytes, std::string where) : bytes_(bytes), where_(std::move(where)) {}

  [[noreturn]] void fail(std::string_view what) const {
    throw std::runtime_error(where_ + ": " + std::string(what));
  }

  // The next n bytes; `what` names the field in the error.
  const char* take(std::size_t n, std::string_view what) {
    if (n > remaining()) fail("truncated file (reading " + std::string(what) + ")");
    const char* p = bytes_.data() + pos_;
    pos_ += n;
    return p;
  }

  template <typename T>
  T get(std::string_view what) {
    static_assert(std::is_trivially_copyable_v<T>);
    T value;
    std::memcpy(&value, take(sizeof value, what), sizeof value);
    return value;
  }

  // count values of T.
  template <typename T>
  std::vector<T> get_array(std::uint64_t count, std::string_view what) {
    static_assert(std::is_trivially_copyable_v<T>);
    if (count > remaining() / sizeof(T)) fail("truncated file (" + std::string(what) + " runs past the end)");
    std::vector<T> values(count);
    const void* bytes = take(count * sizeof(T), what);
    if (count > 0) std::memcpy(values.data(), bytes, count * sizeof(T));  // an empty vector's data() may be null
    return values;
  }

  // A u64 count, then that many values of T.
  template <typename T>
  std::vector<T> get_vector(std::string_view what) {
    return get_array<T>(get<std::uint64_t>(what), what);
  }

  // A u64 length, then that many bytes.
  std::string get_string(std::string_view what) {
    const auto n = get<std::uint64_t>(what);
    if (n > remaining()) fail("truncated file (" + std::string(what) + " runs past the end)");
    return std::string(take(n, what), n);
  }

  // A reader over the next n bytes (a length-prefixed section), which it skips.
  BinaryReader section(std::size_t n, std::string_view what) {
    return BinaryReader(std::string_view(take(n, what), n), where_);
  }

  std::size_t pos() const { return pos_; }
  std::size_t size() const { return bytes_.size(); }
  std::size_t remaining() const { return bytes_.size() - pos_; }
  bool done() const { return pos_ == bytes_.size(); }

 private:
  std::string_view bytes_;
  std::string where_;
  std::size_t pos_ = 0;
};

}  // namespace attention_echo
