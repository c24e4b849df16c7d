// The KV-blend tier (CacheBlend's idea, with a measured guard): prefill a
// prompt from the per-layer K/V of a similar stored request (the donor),
// recomputing only what deviates.
//
//   rows [0, skip)   K/V from the store, exact, never recomputed;
//   layer 0          every other row computed (its output feeds layer 1);
//   layer 1          K/V of every other row projected, compared with the
//                    donor's; the rows that deviate most (recompute_ratio of
//                    the aligned ones), every unaligned row and the last
//                    recent_rows + 1 rows go on ("selected");
//   layers 2..L-1    selected rows computed, every other row's K/V taken
//                    from the donor (K re-rotated where its position moved).
//
// The guard: a deterministic sample of the reused rows is computed along
// with the selected ones; the relative L2 deviation of their fresh K/V from
// the donor's, worst layer, is the request's error estimate (layer 1 is
// measured over every reused row). Above max_error at layer 1 (where most
// bad donors show) the prefill goes on exactly from the layer-0 output it
// already has, wasting only layer 1's projections; above it deeper, the
// blend is finished first (its logits in BlendOutcome::refused_logits, a
// calibration sample), then the same: its work past layer 0 is lost. So is
// a finished blend whose top two next tokens are nearly tied
// (BlendConfig::top1_sigmas).
#pragma once

#include <span>
#include <vector>

#include "attention_echo/llama.hpp"
#include "attention_echo/serving.hpp"
#include "serving/kv_block_store.hpp"
#include "serving/token_alignment.hpp"

namespace attention_echo::serving {

struct BlendOutcome {
  bool blended = false;        // served from the donor (else computed exactly after layer 0)
  double estimated_error = 0;  // guard estimate (worst layer so far when stopped)
  int reused = 0;              // rows whose K/V came from the donor in the deep layers
  int recomputed = 0;          // rows computed in the deep layers (selected + probes)
  int first_layer_rows = 0;    // rows computed in layer 0
  int stopped_at_layer = -1;   // where the guard refused the donor (n_layers: a near tie at the head)
  // Refused past layer 1: the last row's logits of the blend finished anyway
  // (what it would have served), to be measured against the exact result.
  std::vector<float> refused_logits;
};

// Prefills `tokens` into kv (kv must hold exactly the first `skip` rows,
// exact) from `donor` (a stored prompt's K/V, KVBlockStore::state) aligned
// by `alignment`, writing the donor's rows (K re-rotated where they moved)
// into kv's own pages, keeping the logits of the last
// row in result. Throws std::invalid_argument on inconsistent arguments.
// Needs an engine of at least two layers and 0 <= kv.length < tokens.size().
BlendOutcome blend_prefill(llama::Engine& engine, std::span<const int> tokens, const llama::KVState& donor,
                           const TokenAlignment& alignment, llama::KVState& kv, const BlendConfig& config,
                           llama::ForwardResult& result);

// Whether the top two of a row's next-token logits are within reach of the
// logit change a guard lets through at this estimate: a perturbation at KL
// k moves them apart by about 2 sqrt(k), and an estimate e under guard g is
// let through to KL max_kl (e / g)^2 (BlendConfig::top1_sigmas).
bool near_tie(std::span<const float> logits, double estimate, double guard, const BlendConfig& config);

}  // namespace attention_echo::serving
