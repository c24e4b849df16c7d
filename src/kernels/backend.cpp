#include "kernels/backend.hpp"

#include <string>

#include "core/errors.hpp"

namespace attention_echo::kernels {

void Backend::require_device(std::string_view name, Device where) const {
  if (where != device())
    throw_invalid(name, "must be on " + to_string(device()) + " for this backend, got " + to_string(where));
}

}  // namespace attention_echo::kernels
