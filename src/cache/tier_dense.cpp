// Dense echo (docs/architecture.md, "Tiers"): a miss stores the prefix logits
// and mean prefix query; a similar prefix's hit reuses the logits with a
// first-order Taylor step and the new V. It saves only the QK^T half.
#include <algorithm>

#include "cache/tier.hpp"

namespace attention_echo::cache {
namespace {

struct DensePayload final : TierPayload {
  kernels::DenseLogits dense;
  std::size_t bytes() const override { return dense.bytes(); }
};

class DenseTier final : public ReuseTier {
 public:
  explicit DenseTier(const EchoConfig& config)
      : adjustment_strength_(static_cast<float>(config.adjustment_strength)),
        enable_jacobian_(config.enable_jacobian) {}

  Tier kind() const override { return Tier::kDense; }
  Match match() const override { return Match::kSimilarKey; }
  Capture capture_stage() const override { return Capture::kInKernel; }
  bool approximate() const override { return true; }

  std::unique_ptr<const TierPayload> capture(const Call& call, const kernels::Backend& backend) const override {
    auto p = std::make_unique<DensePayload>();
    p->dense = backend.exact_rows_with_dense_logits(call.problem, call.prefix);
    return p;
  }

  // Rows [0, min(p, p_c)); the PV half is still done.
  Served serve(const Call& call, const TierPayload& payload, int stored_prefix,
               const kernels::Backend& backend) const override {
    const int rows = std::min(call.prefix, stored_prefix);
    backend.dense_echo_rows(call.problem, rows, static_cast<const DensePayload&>(payload).dense,
                            adjustment_strength_, enable_jacobian_);
    return {rows, 0.5, 1.0};
  }

  void write(const TierPayload& payload, BinaryWriter& out) const override {
    const kernels::DenseLogits& d = static_cast<const DensePayload&>(payload).dense;
    for (int field : {d.heads, d.prefix, d.dim}) out.put<std::int32_t>(field);
    out.put<std::uint8_t>(d.causal);
    out.put_vector(d.logits);
    out.put_vector(d.mean_query);
  }

  std::unique_ptr<const TierPayload> read(BinaryReader& in) const override {
    auto p = std::make_unique<DensePayload>();
    kernels::DenseLogits& d = p->dense;
    d.heads = in.get<std::int32_t>("dense heads");
    d.prefix = in.get<std::int32_t>("dense prefix");
    d.dim = in.get<std::int32_t>("dense dim");
    d.causal = in.get<std::uint8_t>("dense mask") != 0;
    d.logits = in.get_vector<float>("dense logits");
    d.mean_query = in.get_vector<float>("dense mean query");
    return p;
  }

  std::string validate(const TierPayload& payload, const KeySpace& space, int prefix) const override {
    const kernels::DenseLogits& d = static_cast<const DensePayload&>(payload).dense;
    if (d.heads != space.heads || d.prefix != prefix || d.dim != space.dim || d.causal != space.causal ||
        d.logits.size() != d.head_size() * d.heads ||
        d.mean_query.size() != static_cast<std::size_t>(d.heads) * d.dim)
      return "dense payload shape";
    return "";
  }

 private:
  float adjustment_strength_;
  bool enable_jacobian_;
};

}  // namespace

std::unique_ptr<const ReuseTier> make_dense_tier(const EchoConfig& config) {
  return std::make_unique<DenseTier>(config);
}

}  // namespace attention_echo::cache
