// Exact tier: the same prefix tokens and k fingerprint as a stored entry, so
// the stored prefix output rows are the answer, bit for bit. Captured from
// the finished output of a miss; zero error, so never guarded.
#include "cache/tier.hpp"

namespace attention_echo::cache {
namespace {

struct ExactPayload final : TierPayload {
  std::vector<float> rows;  // [H, prefix, D]
  std::size_t bytes() const override { return rows.size() * sizeof(float); }
};

class ExactTier final : public ReuseTier {
 public:
  Tier kind() const override { return Tier::kExact; }
  Match match() const override { return Match::kTokens; }
  Capture capture_stage() const override { return Capture::kFromOutput; }
  bool approximate() const override { return false; }

  std::unique_ptr<const TierPayload> capture(const Call& call, const kernels::Backend& backend) const override {
    const MutableHeadsView& out = call.problem.out;
    auto p = std::make_unique<ExactPayload>();
    p->rows.resize(static_cast<std::size_t>(out.heads) * call.prefix * out.dim);
    backend.copy_rows(as_const(out), MutableHeadsView::contiguous(p->rows.data(), out.heads, call.prefix, out.dim),
                      call.prefix);
    return p;
  }

  // Token equality makes stored_prefix == call.prefix.
  Served serve(const Call& call, const TierPayload& payload, int, const kernels::Backend& backend) const override {
    const MutableHeadsView& out = call.problem.out;
    const std::vector<float>& rows = static_cast<const ExactPayload&>(payload).rows;
    backend.copy_rows(HeadsView::contiguous(rows.data(), out.heads, call.prefix, out.dim), out, call.prefix);
    return {call.prefix, 0.0, 1.0};
  }

  void write(const TierPayload& payload, BinaryWriter& out) const override {
    out.put_vector(static_cast<const ExactPayload&>(payload).rows);
  }

  std::unique_ptr<const TierPayload> read(BinaryReader& in) const override {
    auto p = std::make_unique<ExactPayload>();
    p->rows = in.get_vector<float>("exact rows");
    return p;
  }

  std::string validate(const TierPayload& payload, const KeySpace& space, int prefix) const override {
    const auto& rows = static_cast<const ExactPayload&>(payload).rows;
    if (rows.size() != static_cast<std::size_t>(space.heads) * prefix * space.dim) return "exact rows size";
    return "";
  }
};

}  // namespace

std::unique_ptr<const ReuseTier> make_exact_tier() { return std::make_unique<ExactTier>(); }

}  // namespace attention_echo::cache
