// What Planner::plan chose to blend from (Plan::blend, opaque in the public
// header): the donors' K/V, the prompt's alignment to them and the blend's
// priced shape.
#pragma once

#include <vector>

#include "attention_echo/llama.hpp"
#include "serving/cost_model.hpp"
#include "serving/token_alignment.hpp"

namespace attention_echo::serving {

struct BlendPlan {
  std::vector<llama::KVState> donors;  // share the donor records' blocks; TokenAlignment::donor indexes them
  TokenAlignment alignment;
  CostModel::BlendShape shape;
};

}  // namespace attention_echo::serving
