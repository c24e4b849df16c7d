// An in-memory L2Store whose reads and writes the input disturbs, as a
// Redis shared by many processes may: a value lost (evicted), the deadline
// cutting the answer short, a write dropped, or bytes other than those
// written handed back (a bit flipped, the value cut short or run on,
// another key's value, or one the target forges with a valid checksum).
// After each get(), met[i] says what the caller met at key i: so a target
// can require that a value is used exactly when it is intact, and counted
// rejected, once, when it is altered. Used by fuzz_kv_l2 and fuzz_cache_l2.
#pragma once

#include <fuzzer/FuzzedDataProvider.h>

#include <cstdint>
#include <functional>
#include <iterator>
#include <map>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include "attention_echo/l2_store.hpp"

namespace attention_echo::fuzzing {

enum class Met { kIntact, kAbsent, kAltered };

class FaultyStore final : public L2Store {
 public:
  // A value with a valid checksum formed for key i of a get(), from the
  // input; sets intact when it came out as the value written there.
  using Forge = std::function<std::string(const std::string& key, std::size_t i, bool& intact)>;

  FaultyStore(FuzzedDataProvider& in, Forge forge) : in_(in), forge_(std::move(forge)) {}

  std::vector<std::string> asked;  // the keys of the last get()
  std::vector<Met> met;             // what the caller met at each
  const std::map<std::string, std::string>& values() const { return values_; }

  std::vector<std::optional<std::string>> get(std::span<const std::string> keys) override {
    std::vector<std::optional<std::string>> out(keys.size());
    asked.assign(keys.begin(), keys.end());
    met.assign(keys.size(), Met::kAbsent);
    for (std::size_t i = 0; i < keys.size(); ++i) {
      const auto it = values_.find(keys[i]);
      if (it == values_.end()) continue;
      const int fault = in_.ConsumeIntegralInRange(0, 9);
      if (fault == 9) break;  // the deadline: nothing from here on
      if (fault == 1) {       // evicted
        values_.erase(it);
        continue;
      }
      if (fault == 6) {
        bool intact = false;
        out[i] = forge_(keys[i], i, intact);
        met[i] = intact ? Met::kIntact : Met::kAltered;
      } else {
        out[i] = disturbed(fault, it->second);
        met[i] = *out[i] == it->second ? Met::kIntact : Met::kAltered;
      }
    }
    return out;
  }

  std::size_t put(std::span<const L2Write> items) override {
    if (in_.ConsumeBool()) return 0;  // the write timed out
    for (const L2Write& w : items) values_[w.key] = w.value;
    return items.size();
  }

  void reject() override { ++rejected_; }
  L2Stats stats() const override { return {.rejected = rejected_}; }

 private:
  // The value as read back under `fault` (an intact copy for the faults
  // that leave it alone, and where the input ran out).
  std::string disturbed(int fault, std::string value) {
    switch (fault) {
      case 2: {  // bits flipped in one byte
        const std::size_t at = in_.ConsumeIntegralInRange<std::size_t>(0, value.size() - 1);
        value[at] = static_cast<char>(value[at] ^ in_.ConsumeIntegralInRange(1, 255));
        return value;
      }
      case 3:  // cut short
        value.resize(in_.ConsumeIntegralInRange<std::size_t>(0, value.size() - 1));
        return value;
      case 4:  // run on (by nothing, where the input ran out)
        return value + in_.ConsumeBytesAsString(in_.ConsumeIntegralInRange(1, 16));
      case 5: {  // another key's value (maybe this key's own)
        auto other = values_.begin();
        std::advance(other, in_.ConsumeIntegralInRange<std::size_t>(0, values_.size() - 1));
        return other->second;
      }
      default: return value;
    }
  }

  FuzzedDataProvider& in_;
  Forge forge_;
  std::map<std::string, std::string> values_;
  std::uint64_t rejected_ = 0;
};

}  // namespace attention_echo::fuzzing
