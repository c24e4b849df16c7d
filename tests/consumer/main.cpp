// Links against the installed library and serves one exact-tier hit.
#include <attention_echo/attention_echo.hpp>

#include <cstdio>
#include <vector>

int main() {
  namespace ae = attention_echo;
  constexpr int kHeads = 2, kTokens = 8, kDim = 4;
  std::vector<float> qkv(kHeads * kTokens * kDim, 0.25f), out(qkv.size()), emb(kTokens * 3, 1.0f);
  std::vector<std::int32_t> tokens = {1, 2, 3, 4, 5, 6};
  ae::AttentionEchoCache cache(ae::EchoConfig{.mode = ae::EchoMode::kOff});
  ae::EchoRequest req;
  req.prefix_length = 6;
  req.prefix_embeddings = {emb.data(), kTokens, 3};
  req.prefix_tokens = tokens;
  auto view = ae::HeadsView::contiguous(qkv.data(), kHeads, kTokens, kDim);
  auto o = ae::MutableHeadsView::contiguous(out.data(), kHeads, kTokens, kDim);
  cache.attention_with_echo(view, view, view, o, req);
  const ae::EchoResult r = cache.attention_with_echo(view, view, view, o, req);
  std::printf("consumer: tier=%s tokens_echoed=%d\n", ae::to_string(r.tier).data(), r.tokens_echoed);
  return r.tier == ae::Tier::kExact ? 0 : 1;
}
