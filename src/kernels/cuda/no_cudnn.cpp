// cudnn_attention.hpp in a build without cuDNN (AE_CUDNN=OFF): every miss
// runs on our kernel.
#include "kernels/cuda/cudnn_attention.hpp"

namespace attention_echo::kernels::cuda {

bool cudnn_available() { return false; }
int cudnn_version() { return 0; }

bool cudnn_attention(const DeviceProblem& problem, float*, void*) {
  check_problem(problem);
  return false;
}

bool cudnn_graphs_earned(const DeviceProblem&, bool, double) { return false; }

}  // namespace attention_echo::kernels::cuda
