#include "core/errors.hpp"

#include <stdexcept>
#include <string>

namespace attention_echo {
namespace {

[[noreturn]] void throw_invalid(std::string_view argument, std::string_view separator, std::string_view what) {
  std::string message(argument);
  message += separator;
  message += what;
  throw std::invalid_argument(message);
}

}  // namespace

void throw_invalid(std::string_view argument, std::string_view what) { throw_invalid(argument, ": ", what); }

void throw_invalid_field(std::string_view field, std::string_view what) { throw_invalid(field, " ", what); }

}  // namespace attention_echo
