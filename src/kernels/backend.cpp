#include "kernels/backend.hpp"

#include <string>

#include "core/errors.hpp"

namespace attention_echo::kernels {

void Backend::require_device(std::string_view name, Device where) const {
  if (where != device())
    throw_invalid(name, "must be on " + to_string(device()) + " for this backend, got " + to_string(where));
}

void Backend::require_device(const AttentionProblem& problem) const {
  require_device("query", problem.q.device);
  require_device("key", problem.k.device);
  require_device("value", problem.v.device);
  require_device("out", problem.out.device);
}

}  // namespace attention_echo::kernels
