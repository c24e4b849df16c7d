// "redis://HOST:PORT?deadline_ms=..&write_timeout_ms=..&backoff_ms=..&max_backoff_ms=..":
// one string configures a store, so the cache config, the planner config,
// the CLI and Python each carry a single field.
#include <charconv>
#include <cmath>
#include <string>

#include "attention_echo/l2_store.hpp"
#include "core/errors.hpp"

namespace attention_echo {
namespace {

double parse_positive(std::string_view text, std::string_view argument, std::string_view name) {
  double value = 0.0;
  const auto [end, ec] = std::from_chars(text.data(), text.data() + text.size(), value);
  if (ec != std::errc() || end != text.data() + text.size() || !std::isfinite(value) || value <= 0.0)
    throw_invalid(argument, std::string(name) + " must be a positive number, got '" + std::string(text) + "'");
  return value;
}

void parse_option(std::string_view option, L2Options& o, std::string_view argument) {
  const auto eq = option.find('=');
  if (eq == std::string_view::npos) throw_invalid(argument, "option '" + std::string(option) + "' has no '='");
  const std::string_view name = option.substr(0, eq), value = option.substr(eq + 1);
  double* field = name == "deadline_ms"        ? &o.deadline_ms
                  : name == "write_timeout_ms" ? &o.write_timeout_ms
                  : name == "backoff_ms"       ? &o.backoff_ms
                  : name == "max_backoff_ms"   ? &o.max_backoff_ms
                                               : nullptr;
  if (field == nullptr) throw_invalid(argument, "unknown option '" + std::string(name) + "'");
  *field = parse_positive(value, argument, name);
}

}  // namespace

L2Options parse_l2_url(std::string_view url, std::string_view argument) {
  constexpr std::string_view scheme = "redis://";
  if (!url.starts_with(scheme))
    throw_invalid(argument, "must look like redis://HOST:PORT, got '" + std::string(url) + "'");
  L2Options o;
  std::string_view rest = url.substr(scheme.size()), query;
  if (const auto q = rest.find('?'); q != std::string_view::npos) query = rest.substr(q + 1), rest = rest.substr(0, q);
  const auto colon = rest.rfind(':');
  if (colon == std::string_view::npos || colon == 0 || rest.find('/') != std::string_view::npos)
    throw_invalid(argument, "must look like redis://HOST:PORT, got '" + std::string(url) + "'");
  o.host = std::string(rest.substr(0, colon));
  const std::string_view port = rest.substr(colon + 1);
  const auto [end, ec] = std::from_chars(port.data(), port.data() + port.size(), o.port);
  if (ec != std::errc() || end != port.data() + port.size() || o.port < 1 || o.port > 65535)
    throw_invalid(argument, "port must be in 1..65535, got '" + std::string(port) + "'");
  while (!query.empty()) {
    const auto amp = query.find('&');
    parse_option(query.substr(0, amp), o, argument);
    query = amp == std::string_view::npos ? std::string_view{} : query.substr(amp + 1);
  }
  if (o.max_backoff_ms < o.backoff_ms) throw_invalid(argument, "max_backoff_ms must be at least backoff_ms");
  return o;
}

}  // namespace attention_echo
