// The loaders under fuzzing take a path: each input is written to a file of
// this process's own (parallel fuzzing jobs do not share one).
#pragma once

#include <unistd.h>

#include <cstdint>
#include <fstream>
#include <string>

namespace attention_echo::fuzzing {

inline const std::string& input_path() {
  static const std::string path = "/tmp/ae_fuzz_input_" + std::to_string(getpid());
  return path;
}

inline const std::string& write_input(const std::uint8_t* data, std::size_t size) {
  std::ofstream out(input_path(), std::ios::binary | std::ios::trunc);
  out.write(reinterpret_cast<const char*>(data), static_cast<std::streamsize>(size));
  return input_path();
}

}  // namespace attention_echo::fuzzing
