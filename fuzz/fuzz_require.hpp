// A fuzz target's invariant: a broken one aborts, which libFuzzer reports
// as a finding with the input that broke it.
#pragma once

#include <cstdlib>

namespace attention_echo::fuzzing {

inline void require(bool condition) {
  if (!condition) std::abort();
}

}  // namespace attention_echo::fuzzing
