// The library's one way to reject an argument (docs/architecture.md,
// "Errors"): std::invalid_argument whose message starts with the argument's
// name, so callers and the Python layer can tell which input was wrong.
#pragma once

#include <string_view>

namespace attention_echo {

// Throws std::invalid_argument("argument: what").
[[noreturn]] void throw_invalid(std::string_view argument, std::string_view what);

// Throws std::invalid_argument("field what"): the form of EchoConfig's
// messages, which are the seed's texts word for word ("capacity must be
// positive"), so code written against the seed keeps matching them.
[[noreturn]] void throw_invalid_field(std::string_view field, std::string_view what);

}  // namespace attention_echo
