// What Planner::plan chose to blend from (Plan::blend, opaque in the public
// header): the donor's K/V, its alignment to the prompt and the blend's
// priced shape.
#pragma once

#include "attention_echo/llama.hpp"
#include "serving/cost_model.hpp"
#include "serving/token_alignment.hpp"

namespace attention_echo::serving {

struct BlendPlan {
  llama::KVState donor;  // shares the donor record's blocks
  TokenAlignment alignment;
  CostModel::BlendShape shape;
};

}  // namespace attention_echo::serving
