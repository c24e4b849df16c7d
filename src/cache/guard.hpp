// The verification guard (docs/architecture.md, "Verification guard"): an
// approximate hit is served only if the exact outputs of a few prefix rows
// per head agree with it within max_error (relative L2). max_error = inf
// turns it off.
#pragma once

#include "kernels/backend.hpp"

namespace attention_echo::cache {

class Guard {
 public:
  Guard(double max_error, int verify_rows) : max_error_(max_error), verify_rows_(verify_rows) {}

  struct Verdict {
    double error;  // max over heads on the guard rows; NaN when the guard is off
    double flops;  // attention FLOPs the check spent
    bool accepted;
  };

  // Checks prefix rows [0, rows) of problem.out, which a tier just wrote.
  Verdict check(const kernels::AnyAttentionProblem& problem, int rows, const kernels::Backend& backend) const;

 private:
  double max_error_;
  int verify_rows_;
};

}  // namespace attention_echo::cache
