// Forces one SIMD path of the kernels for a scope (tests run every path the
// machine has against the same reference).
#pragma once

#include "kernels/isa.hpp"

namespace attention_echo::testing {

class IsaScope {
 public:
  explicit IsaScope(kernels::Isa isa) : saved_(kernels::active_isa()) { kernels::set_active_isa(isa); }
  ~IsaScope() { kernels::set_active_isa(saved_); }
  IsaScope(const IsaScope&) = delete;
  IsaScope& operator=(const IsaScope&) = delete;

 private:
  kernels::Isa saved_;
};

}  // namespace attention_echo::testing
