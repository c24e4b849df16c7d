// cudnn_attention.hpp on cudnn-frontend's graph API: a graph per call shape,
// built once per thread (cuDNN handles and graphs are not shared across
// threads) and kept for the process's life.
//
// cuDNN is opened at run time (the frontend's dynamic loading,
// NV_CUDNN_FRONTEND_USE_DYNAMIC_LOADING): the library loads and runs every
// miss on our kernel where cuDNN is absent, and a cuDNN 9 older than the
// headers works (frontend 1.32 refers to symbols cuDNN 9.19 lacks, so a
// linked library failed to load there with RTLD_NOW, as ctypes and Python
// imports open it).
#include "kernels/cuda/cudnn_attention.hpp"

#include <cuda_runtime.h>
#include <cudnn.h>
#include <cudnn_frontend.h>
#include <dlfcn.h>

#include <algorithm>
#include <compare>
#include <cstdint>
#include <map>
#include <memory>
#include <stdexcept>
#include <string>
#include <unordered_map>

// The frontend's handle of the opened library (it declares, we define).
namespace cudnn_frontend {
void* cudnn_dlhandle = nullptr;
}

namespace attention_echo::kernels::cuda {
namespace {

namespace fe = cudnn_frontend;

// libcudnn.so.9 from the loader's path (or a process that already holds it,
// as PyTorch's does), else the one the build found.
bool load_cudnn() {
  static const bool loaded = [] {
    for (const char* name : {"libcudnn.so.9", AE_CUDNN_LIBRARY_PATH})
      if ((fe::cudnn_dlhandle = dlopen(name, RTLD_NOW | RTLD_LOCAL)) != nullptr) return true;
    return false;
  }();
  return loaded;
}

enum Uid : std::int64_t { kQ = 1, kK, kV, kO, kStats };

// One cuDNN call: `rows` query rows of every head over `keys` keys (strides
// in elements); stats_head_stride > 0 asks for the row log-sum-exp.
struct Call {
  DType dtype;
  int heads, kv_heads, rows, keys, dim;
  std::int64_t q_head, q_token, k_head, k_token, v_head, v_token, o_head, o_token, stats_head;
  bool causal;
  float scale;
  auto operator<=>(const Call&) const = default;
};

// A built graph and its workspace; graph null where cuDNN refused the call.
struct Built {
  std::shared_ptr<fe::graph::Graph> graph;
  std::int64_t workspace = 0;
};

void check_cudnn(cudnnStatus_t status, const char* what) {
  if (status != CUDNN_STATUS_SUCCESS)
    throw std::runtime_error(std::string(what) + ": " + fe::detail::get_error_string(status));
}

int current_device() {
  int device = 0;
  if (cudaGetDevice(&device) != cudaSuccess) throw std::runtime_error("cudaGetDevice failed");
  return device;
}

// This thread's handle on the current device. Never destroyed: at process
// exit the CUDA context may be gone before thread-locals are.
cudnnHandle_t handle() {
  thread_local std::map<int, cudnnHandle_t> handles;
  auto [it, added] = handles.try_emplace(current_device(), nullptr);
  if (added) {
    try {
      check_cudnn(fe::detail::create_handle(&it->second), "cudnnCreate");
    } catch (...) {
      handles.erase(it);
      throw;
    }
  }
  return it->second;
}

std::shared_ptr<fe::graph::Tensor_attributes> heads_tensor(fe::graph::Graph& graph, const char* name, Uid uid,
                                                           int heads, int tokens, int dim, std::int64_t head_stride,
                                                           std::int64_t token_stride) {
  return graph.tensor(fe::graph::Tensor_attributes()
                          .set_name(name)
                          .set_uid(uid)
                          .set_dim({1, heads, tokens, dim})
                          .set_stride({heads * head_stride, head_stride, token_stride, 1}));
}

// Where the frontend throws (a CUDA runtime library it opens is missing), as
// where cuDNN refuses: no graph, our kernel runs the call.
Built build(const Call& c) try {
  auto graph = std::make_shared<fe::graph::Graph>();
  graph->set_io_data_type(c.dtype == DType::kBF16 ? fe::DataType_t::BFLOAT16 : fe::DataType_t::HALF)
      .set_intermediate_data_type(fe::DataType_t::FLOAT)
      .set_compute_data_type(fe::DataType_t::FLOAT);
  const auto q = heads_tensor(*graph, "Q", kQ, c.heads, c.rows, c.dim, c.q_head, c.q_token);
  const auto k = heads_tensor(*graph, "K", kK, c.kv_heads, c.keys, c.dim, c.k_head, c.k_token);
  const auto v = heads_tensor(*graph, "V", kV, c.kv_heads, c.keys, c.dim, c.v_head, c.v_token);
  auto options = fe::graph::SDPA_attributes().set_name("miss").set_generate_stats(c.stats_head > 0).set_attn_scale(c.scale);
  // Bottom-right: q row r sees keys <= r + (keys - rows), the causal rule for rows [query_offset, T).
  if (c.causal) options.set_causal_mask_bottom_right(true);
  const auto outputs = graph->sdpa(q, k, v, options);
  outputs[0]->set_output(true).set_uid(kO).set_dim({1, c.heads, c.rows, c.dim}).set_stride(
      {c.heads * c.o_head, c.o_head, c.o_token, 1});
  if (c.stats_head > 0)
    outputs[1]->set_output(true).set_uid(kStats).set_data_type(fe::DataType_t::FLOAT).set_dim({1, c.heads, c.rows, 1}).set_stride(
        {c.heads * c.stats_head, c.stats_head, 1, 1});
  const cudnnHandle_t h = handle();
  if (!graph->validate().is_good() || !graph->build_operation_graph(h).is_good() ||
      !graph->create_execution_plans({fe::HeurMode_t::A}).is_good() || !graph->check_support(h).is_good() ||
      !graph->build_plans(fe::BuildPlanPolicy_t::HEURISTICS_CHOICE).is_good())
    return {};
  Built built{graph, 0};
  if (!graph->get_workspace_size(built.workspace).is_good()) return {};
  return built;
} catch (const std::exception&) {
  return {};
}

// This thread's graphs per device and call, and the work of the calls not
// yet built (for cudnn_graphs_earned).
struct ThreadGraphs {
  std::map<std::pair<int, Call>, Built> built;
  std::map<std::pair<int, Call>, double> pending_work;
};
ThreadGraphs& thread_graphs() {
  thread_local ThreadGraphs graphs;
  return graphs;
}

// The built graph of a call on this thread and device (built on first use).
const Built& built(const Call& c) {
  auto& graphs = thread_graphs().built;
  const auto key = std::make_pair(current_device(), c);
  auto it = graphs.find(key);
  if (it == graphs.end()) it = graphs.emplace(key, build(c)).first;
  return it->second;
}

void execute(const Built& b, const void* q, const void* k, const void* v, void* out, float* stats, void* stream) {
  const cudnnHandle_t h = handle();
  check_cudnn(fe::detail::set_stream(h, static_cast<cudaStream_t>(stream)), "cudnnSetStream");
  const DeviceBuffer workspace(static_cast<std::size_t>(b.workspace), stream);
  std::unordered_map<std::int64_t, void*> pack{
      {kQ, const_cast<void*>(q)}, {kK, const_cast<void*>(k)}, {kV, const_cast<void*>(v)}, {kO, out}};
  if (stats != nullptr) pack.emplace(kStats, stats);
  auto status = b.graph->execute(h, pack, workspace.data());
  if (!status.is_good()) throw std::runtime_error("cuDNN attention: " + status.get_message());
}

// A row range [begin, end) of the problem over keys [0, keys) as one call.
struct Part {
  int begin, end, keys;
  bool causal;
};

Call call_of(const DeviceProblem& p, const Part& part, bool stats) {
  return {p.q.dtype,          p.q.heads,         p.k.heads,         part.end - part.begin, part.keys,
          p.q.dim,            p.q.head_stride,   p.q.token_stride,  p.k.head_stride,       p.k.token_stride,
          p.v.head_stride,    p.v.token_stride,  p.out.head_stride, p.out.token_stride,
          stats ? static_cast<std::int64_t>(p.q.tokens) : 0, part.causal, p.scale};
}

// Causal: one call. Non-causal: the prefix rows over the prefix keys, then
// the rows past it over every key (either may be empty). Returns the count.
int parts_of(const DeviceProblem& p, Part (&parts)[2]) {
  const int T = p.k.tokens, first = p.query_offset;
  int count = 0;
  if (p.causal) {
    if (first < T) parts[count++] = {first, T, T, true};
  } else {
    if (first < p.prefix_length) parts[count++] = {first, p.prefix_length, p.prefix_length, false};
    if (std::max(first, p.prefix_length) < T) parts[count++] = {std::max(first, p.prefix_length), T, T, false};
  }
  return count;
}

}  // namespace

int cudnn_version() { return load_cudnn() ? static_cast<int>(fe::detail::get_backend_version()) : 0; }

bool cudnn_available() {
  if (cudnn_version() / 10000 != CUDNN_MAJOR) return false;  // absent, or another major's API
  try {
    handle();
    return true;
  } catch (const std::runtime_error&) {
    return false;
  }
}

bool cudnn_graphs_earned(const DeviceProblem& p, bool row_lse, double build_work) {
  ThreadGraphs& graphs = thread_graphs();
  Part parts[2];
  const int count = parts_of(p, parts);
  bool earned = true;
  for (int i = 0; i < count; ++i) {
    const auto key = std::make_pair(current_device(), call_of(p, parts[i], row_lse));
    if (graphs.built.count(key) != 0) continue;
    double& work = graphs.pending_work[key];
    work += double(p.q.heads) * (parts[i].end - parts[i].begin) * parts[i].keys * p.q.dim;
    if (work < build_work) earned = false;
  }
  return earned;
}

bool cudnn_attention(const DeviceProblem& p, float* row_lse, void* stream) {
  check_problem(p);
  const int first = p.query_offset;
  Part parts[2];
  const int count = parts_of(p, parts);
  if (count == 0) return true;
  if (!cudnn_available()) return false;
  const Built* graphs[2] = {nullptr, nullptr};
  for (int i = 0; i < count; ++i) {
    graphs[i] = &built(call_of(p, parts[i], row_lse != nullptr));
    if (graphs[i]->graph == nullptr) return false;  // refused: nothing queued yet
  }
  for (int i = 0; i < count; ++i) {
    const std::int64_t skip = parts[i].begin - first;  // rows into q, out and row_lse
    const auto* q = static_cast<const char*>(p.q.data) + skip * p.q.token_stride * 2;
    auto* out = static_cast<char*>(p.out.data) + skip * p.out.token_stride * 2;
    execute(*graphs[i], q, p.k.data, p.v.data, out, row_lse != nullptr ? row_lse + skip : nullptr, stream);
  }
  return true;
}

}  // namespace attention_echo::kernels::cuda
