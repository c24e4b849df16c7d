#include "cache/tier.hpp"

#include <algorithm>
#include <cassert>

namespace attention_echo::cache {

TierSet::TierSet(const EchoConfig& config) {
  auto add = [&](std::unique_ptr<const ReuseTier> tier, bool enabled) {
    if (enabled) enabled_.push_back(tier.get());
    all_.push_back(std::move(tier));
  };
  // Best first. The exact tier is always on; mode picks the approximate one.
  add(make_exact_tier(), true);
  add(make_sparse_tier(config), config.mode == EchoMode::kSparse);
  add(make_dense_tier(config), config.mode == EchoMode::kDense);
  assert(std::ranges::count_if(enabled_, [](const ReuseTier* t) {
           return t->capture_stage() == Capture::kInKernel;
         }) <= 1);
}

const ReuseTier* TierSet::find(Tier kind) const {
  for (const auto& tier : all_)
    if (tier->kind() == kind) return tier.get();
  return nullptr;
}

}  // namespace attention_echo::cache
