// Exact tier: the same prefix tokens and k fingerprint as a stored entry, so
// the stored prefix output rows are the answer, bit for bit. Captured from
// the finished output of a miss into memory of the call's backend (device
// memory for a CUDA call); zero error, so never guarded.
#include <algorithm>

#include "cache/tier.hpp"

namespace attention_echo::cache {
namespace {

struct ExactPayload final : TierPayload {
  std::unique_ptr<kernels::PayloadBuffer> rows;  // [H, prefix, D] of the space's dtype
  std::size_t bytes() const override { return rows->bytes(); }
};

// The stored rows as a view of the call's dtype and device.
MutableAnyHeadsView rows_view(const ExactPayload& p, const Call& call) {
  const MutableAnyHeadsView& out = call.problem.out;
  return MutableAnyHeadsView::contiguous(p.rows->data(), out.dtype, out.heads, call.prefix, out.dim, out.device);
}

class ExactTier final : public ReuseTier {
 public:
  Tier kind() const override { return Tier::kExact; }
  Match match() const override { return Match::kTokens; }
  Capture capture_stage() const override { return Capture::kFromOutput; }
  bool approximate() const override { return false; }

  std::unique_ptr<const TierPayload> capture(const Call& call, const kernels::Backend& backend) const override {
    const MutableAnyHeadsView& out = call.problem.out;
    auto p = std::make_unique<ExactPayload>();
    p->rows = backend.allocate(static_cast<std::size_t>(out.heads) * call.prefix * out.dim * dtype_size(out.dtype));
    backend.copy_rows(as_const(out), rows_view(*p, call), call.prefix);
    return p;
  }

  // Token equality makes stored_prefix == call.prefix.
  Served serve(const Call& call, const TierPayload& payload, int, const kernels::Backend& backend) const override {
    backend.copy_rows(as_const(rows_view(static_cast<const ExactPayload&>(payload), call)), call.problem.out,
                      call.prefix);
    return {call.prefix, 0.0, 1.0};
  }

  // Snapshots hold host (float32) entries only.
  void write(const TierPayload& payload, BinaryWriter& out) const override {
    const kernels::PayloadBuffer& rows = *static_cast<const ExactPayload&>(payload).rows;
    const auto* first = static_cast<const float*>(rows.data());
    out.put_vector(std::vector<float>(first, first + rows.bytes() / sizeof(float)));
  }

  std::unique_ptr<const TierPayload> read(BinaryReader& in) const override {
    const std::vector<float> rows = in.get_vector<float>("exact rows");
    auto p = std::make_unique<ExactPayload>();
    p->rows = std::make_unique<kernels::HostBuffer>(rows.size() * sizeof(float));
    // std::copy, not memcpy: an empty payload (a corrupt file's) has null data.
    std::copy(rows.begin(), rows.end(), static_cast<float*>(p->rows->data()));
    return p;
  }

  std::string validate(const TierPayload& payload, const KeySpace& space, int prefix) const override {
    const std::size_t bytes = static_cast<const ExactPayload&>(payload).rows->bytes();
    if (bytes != static_cast<std::size_t>(space.heads) * prefix * space.dim * sizeof(float)) return "exact rows size";
    return "";
  }
};

}  // namespace

std::unique_ptr<const ReuseTier> make_exact_tier() { return std::make_unique<ExactTier>(); }

}  // namespace attention_echo::cache
