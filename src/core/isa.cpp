#include "core/isa.hpp"

#include <atomic>
#include <cstdlib>
#include <string_view>


namespace attention_echo {
namespace {

Isa detect() {
  __builtin_cpu_init();
  // __builtin_cpu_supports also checks that the OS saves the wide registers.
  if (__builtin_cpu_supports("avx512f")) return Isa::kAvx512;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return Isa::kAvx2;
  return Isa::kScalar;
}

Isa clamp(Isa requested) { return requested < best_isa() ? requested : best_isa(); }

Isa from_environment() {
  const char* env = std::getenv("AE_ISA");
  if (env == nullptr) return best_isa();
  const std::string_view name(env);
  if (name == "scalar") return Isa::kScalar;
  if (name == "avx2") return clamp(Isa::kAvx2);
  return best_isa();
}

std::atomic<Isa>& active() {
  static std::atomic<Isa> isa{from_environment()};
  return isa;
}

}  // namespace

const char* to_string(Isa isa) {
  switch (isa) {
    case Isa::kAvx512: return "avx512";
    case Isa::kAvx2: return "avx2";
    case Isa::kScalar: break;
  }
  return "scalar";
}

Isa best_isa() {
  static const Isa best = detect();
  return best;
}

Isa active_isa() { return active().load(std::memory_order_relaxed); }

Isa set_active_isa(Isa isa) {
  active().store(clamp(isa), std::memory_order_relaxed);
  return active_isa();
}

std::vector<Isa> supported_isas() {
  std::vector<Isa> isas;
  for (Isa isa : {Isa::kScalar, Isa::kAvx2, Isa::kAvx512})
    if (isa <= best_isa()) isas.push_back(isa);
  return isas;
}

}  // namespace attention_echo
