// Forces one SIMD path of the kernels for a scope (tests run every path the
// machine has against the same reference).
#pragma once

#include "core/isa.hpp"

namespace attention_echo::testing {

class IsaScope {
 public:
  explicit IsaScope(Isa isa) : saved_(active_isa()) { set_active_isa(isa); }
  ~IsaScope() { set_active_isa(saved_); }
  IsaScope(const IsaScope&) = delete;
  IsaScope& operator=(const IsaScope&) = delete;

 private:
  Isa saved_;
};

}  // namespace attention_echo::testing
