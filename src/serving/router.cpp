#include <algorithm>
#include <stdexcept>
#include <vector>

#include "attention_echo/serving.hpp"
#include "serving/cost_model.hpp"

namespace attention_echo::serving {
namespace {

// The expected cost of a cache-routed prefix block next to exact attention
// before any was measured: at sparse_mass 0.98 the sparse tier keeps 55-68%
// of the prefix tiles of trained models; without an approximate tier the
// cache can never beat reusing stored K/V.
double cache_prior(const AttentionEchoCache* cache) {
  if (!cache) return 1.0;
  const EchoMode mode = cache->config().mode;
  return mode == EchoMode::kSparse || mode == EchoMode::kDense ? 0.6 : 1.0;
}

bool every_layer_exact(const std::vector<EchoResult>& echo) {
  return std::all_of(echo.begin(), echo.end(),
                     [](const EchoResult& e) { return e.tier == Tier::kNone || e.tier == Tier::kExact; });
}

bool found_candidate(const std::vector<EchoResult>& echo) {
  return std::any_of(echo.begin(), echo.end(), [](const EchoResult& e) { return e.tier != Tier::kNone || e.rejected; });
}

double attention_cpu_s(const llama::ForwardResult& result) {
  double sum = 0.0;
  for (double s : result.attention_cpu_s) sum += s;
  return sum;
}

}  // namespace

struct Router::Impl {
  AttentionEchoCache* cache;
  std::string name_space;
  PrefixStore store;
  CostModel cost;
};

Router::Router(AttentionEchoCache* cache, std::string name_space, std::size_t store_bytes)
    : impl_(std::make_unique<Impl>(cache, std::move(name_space), PrefixStore(store_bytes), CostModel(cache_prior(cache)))) {}
Router::~Router() = default;
Router::Router(Router&&) noexcept = default;

Plan Router::plan(std::span<const int> tokens, int prefix_length) {
  const int T = static_cast<int>(tokens.size());
  if (prefix_length < 0 || prefix_length >= T)
    throw std::invalid_argument("prefix_length: must be in [0, tokens) (the last token is always computed)");
  const PrefixStore::Match match = impl_->store.longest_match(tokens);
  const int L = std::min(match.length, T - 1);
  Plan plan;
  plan.prefix_length = prefix_length;
  const bool reuse = !impl_->cache || L >= prefix_length ||
                     impl_->cost.reuse(T, L) <= impl_->cost.cache(T, prefix_length);
  if (!reuse) {
    plan.route = Plan::Route::kCache;
    return plan;
  }
  if (L > 0) plan.kv = match.kv->prefix(L);
  plan.reused_exact = L == 0 || match.exact;
  return plan;
}

llama::ForwardResult Router::execute(llama::Engine& engine, std::span<const int> tokens, Plan& plan, int keep_rows) {
  const int T = static_cast<int>(tokens.size()), p = plan.prefix_length;
  if (plan.route == Plan::Route::kReuse) {
    llama::ForwardResult result = engine.forward(tokens.subspan(plan.kv.length), plan.kv, {}, keep_rows);
    impl_->store.insert(tokens, plan.kv, plan.reused_exact);
    return result;
  }
  if (!impl_->cache) throw std::invalid_argument("plan: routed through the cache, but this router has none");
  if (plan.kv.length != 0) throw std::invalid_argument("plan: a cache-routed plan starts from empty K/V");
  const llama::AttentionRoute route{impl_->cache, p, tokens.first(p), impl_->name_space};
  llama::ForwardResult result = engine.forward(tokens, plan.kv, route, keep_rows);
  if (found_candidate(result.echo)) impl_->cost.observe_cache(T, p, attention_cpu_s(result));
  impl_->store.insert(tokens, plan.kv, every_layer_exact(result.echo));
  return result;
}

void Router::observe(int rows, double total_cpu_s, double attention_cpu_s) {
  impl_->cost.observe(rows, total_cpu_s, attention_cpu_s);
}

}  // namespace attention_echo::serving
