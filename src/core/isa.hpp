// The one CPU-feature dispatcher: which SIMD code path the attention kernels,
// the engine's GEMM and the semantic index run. The best path this CPU
// supports is detected once; AE_ISA=scalar|avx2|avx512 (read once, at first
// use) or set_active_isa() can force a lower one so tests can check every
// path the machine has against the reference. A request above what the CPU
// supports falls back to the best supported path.
#pragma once

#include <vector>

namespace attention_echo {

enum class Isa { kScalar = 0, kAvx2 = 1, kAvx512 = 2 };

const char* to_string(Isa isa);
Isa best_isa();
Isa active_isa();
// Returns the path now active (request clamped to best_isa()). Rows computed
// under different paths are not bit-identical: switch only between calls.
Isa set_active_isa(Isa isa);
// Every path this machine can run, scalar first.
std::vector<Isa> supported_isas();

}  // namespace attention_echo
