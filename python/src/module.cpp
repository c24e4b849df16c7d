// attention_echo._core: the nanobind layer over the C++ library.
//
// Kept deliberately thin. Arrays arrive as float32 CPU ndarrays (NumPy via
// the buffer protocol / DLPack, PyTorch via DLPack), or for the cache as
// float16/bfloat16 CUDA arrays (PyTorch via DLPack, with the stream to run
// on), whose last dimension is contiguous; they are handed to the core as
// views with their own strides, dtype and device, so no copy is made. The pure-Python wrapper (attention_echo/_cache.py) does
// the type and dtype conversions and allocates the output; this file only maps
// shapes and strides, releases the GIL around C++ work and turns results into
// Python objects. std::invalid_argument from the core becomes ValueError
// (nanobind's default translation).
#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>
#include <nanobind/stl/optional.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/vector.h>

#include <climits>
#include <cstdint>
#include <optional>
#include <span>
#include <stdexcept>
#include <string>
#include <vector>

#include "attention_echo/attention.hpp"
#include "attention_echo/cache.hpp"
#include "attention_echo/config.hpp"
#include "attention_echo/engine.hpp"
#include "attention_echo/tensor.hpp"

namespace nb = nanobind;
using namespace nb::literals;

namespace ae = attention_echo;

namespace {

// Any strides; the wrapper guarantees dtype float32, CPU and a unit last stride.
using InArray = nb::ndarray<const float, nb::device::cpu>;
using OutArray = nb::ndarray<float, nb::device::cpu>;
// Any dtype and device (inputs may be read-only); the core checks what its backend runs.
using AnyInArray = nb::ndarray<nb::ro>;
using AnyOutArray = nb::ndarray<>;
using Matrix = nb::ndarray<const float, nb::ndim<2>, nb::c_contig, nb::device::cpu>;
using Tokens = nb::ndarray<const std::int32_t, nb::ndim<1>, nb::c_contig, nb::device::cpu>;

[[noreturn]] void fail(const char* name, const std::string& what) {
  throw std::invalid_argument(std::string(name) + ": " + what);
}

int to_int(std::size_t n, const char* name) {
  if (n > static_cast<std::size_t>(INT_MAX)) fail(name, "dimension too large");
  return static_cast<int>(n);
}

template <typename Array>
ae::DType dtype_of(const Array& a, const char* name) {
  const nb::dlpack::dtype t = a.dtype();
  if (t == nb::dtype<float>()) return ae::DType::kF32;
  if (t.lanes == 1 && t.bits == 16 && t.code == static_cast<std::uint8_t>(nb::dlpack::dtype_code::Float))
    return ae::DType::kF16;
  if (t.lanes == 1 && t.bits == 16 && t.code == static_cast<std::uint8_t>(nb::dlpack::dtype_code::Bfloat))
    return ae::DType::kBF16;
  fail(name, "dtype must be float32, float16 or bfloat16");
}

template <typename Array>
ae::Device device_of(const Array& a, const char* name) {
  if (a.device_type() == nb::device::cpu::value) return ae::Device::cpu();
  if (a.device_type() == nb::device::cuda::value) return ae::Device::cuda(a.device_id());
  fail(name, "must be in host or CUDA device memory");
}

// (T, D) is one head; (H, T, D) is H heads. Strides are in elements.
template <typename Void, typename Array>
ae::BasicAnyHeadsView<Void> heads_view(const Array& a, const char* name) {
  if (a.ndim() != 2 && a.ndim() != 3)
    fail(name, "must have shape (T, D) or (H, T, D), got ndim " + std::to_string(a.ndim()));
  const std::size_t nd = a.ndim();
  if (a.shape(nd - 1) > 1 && a.stride(nd - 1) != 1)
    fail(name, "last dimension must be contiguous (stride 1)");
  ae::BasicAnyHeadsView<Void> view;
  view.data = static_cast<Void*>(a.data());
  view.dtype = dtype_of(a, name);
  view.device = device_of(a, name);
  view.dim = to_int(a.shape(nd - 1), name);
  view.tokens = to_int(a.shape(nd - 2), name);
  view.token_stride = static_cast<std::ptrdiff_t>(a.stride(nd - 2));
  if (nd == 3) {
    view.heads = to_int(a.shape(0), name);
    view.head_stride = static_cast<std::ptrdiff_t>(a.stride(0));
  } else {
    view.heads = 1;
    view.head_stride = view.token_stride * view.tokens;
  }
  return view;
}

ae::MatrixView matrix_view(const std::optional<Matrix>& m, const char* name) {
  if (!m) return {};
  return {m->data(), to_int(m->shape(0), name), to_int(m->shape(1), name)};
}

nb::dict result_dict(const ae::EchoResult& r) {
  nb::dict d;
  d["echo_hit"] = r.echo_hit;
  d["similarity"] = r.similarity;
  d["layer_id"] = r.layer_id;
  d["tokens_echoed"] = r.tokens_echoed;
  d["tokens_computed"] = r.tokens_computed;
  d["compute_mode"] = std::string(r.compute_mode());
  d["tier"] = std::string(ae::to_string(r.tier));
  d["estimated_error"] = r.estimated_error;
  d["rejected"] = r.rejected;
  d["kept_fraction"] = r.kept_fraction;
  return d;
}

nb::dict stats_dict(const ae::CacheStats& s, const ae::EchoConfig& config) {
  nb::dict d;
  // The seed's keys first ...
  d["hits"] = s.hits();
  d["misses"] = s.misses;
  d["total_lookups"] = s.lookups;
  d["hit_rate"] = s.hit_rate();
  d["cache_size"] = s.entries;
  d["capacity"] = config.capacity;
  // (the seed counted "ops_saved"; ours is the attention FLOPs not spent)
  d["ops_saved"] = static_cast<long long>(s.flops_saved);
  // ... then ours.
  d["hits_exact"] = s.hits_exact;
  d["hits_sparse"] = s.hits_sparse;
  d["hits_dense"] = s.hits_dense;
  d["rejected"] = s.rejected;
  d["evictions"] = s.evictions;
  d["snapshot_dropped"] = s.snapshot_dropped;  // snapshot entries load() could not keep
  d["oversize_skipped"] = s.oversize_skipped;  // misses whose entry alone exceeds max_bytes
  d["bytes"] = s.bytes;
  d["max_bytes"] = config.max_bytes;
  d["device_max_bytes"] = config.device_max_bytes;
  d["tokens_echoed"] = s.tokens_echoed;
  d["tokens_computed"] = s.tokens_computed;
  d["flops_saved"] = s.flops_saved;
  return d;
}

nb::dict l2_stats_dict(const ae::L2Stats& s) {
  nb::dict d;
  d["lookups"] = s.lookups;
  d["hits"] = s.hits;
  d["misses"] = s.misses;
  d["hit_rate"] = s.hit_rate();
  d["rejected"] = s.rejected;
  d["timeouts"] = s.timeouts;
  d["errors"] = s.errors;
  d["unavailable"] = s.unavailable;
  d["reconnects"] = s.reconnects;
  d["writes"] = s.writes;
  d["lookup_seconds"] = s.lookup_seconds;
  d["max_lookup_seconds"] = s.max_lookup_seconds;
  return d;
}

template <class T>
nb::ndarray<nb::numpy, T, nb::ndim<1>> to_numpy(std::vector<T>&& v) {
  auto* owned = new std::vector<T>(std::move(v));
  nb::capsule deleter(owned, [](void* p) noexcept { delete static_cast<std::vector<T>*>(p); });
  return nb::ndarray<nb::numpy, T, nb::ndim<1>>(owned->data(), {owned->size()}, deleter);
}

// One pool (all hardware threads) for module-level attention(); never
// destroyed, so interpreter shutdown never waits on its workers.
ae::ThreadPool& shared_pool() {
  static ae::ThreadPool* pool = new ae::ThreadPool(0);
  return *pool;
}

}  // namespace

// A llama2.c/GGUF model prefilled through the serving planner: the model,
// its engine and thread pool, and the planner's store live together.
struct LlamaServer {
  ae::llama::Model model;
  ae::ThreadPool pool;
  ae::llama::Engine engine;
  ae::serving::Planner planner;
  // The model's tokenizer (llama::model_tokenizer), or why there is none:
  // a model without one still serves token ids.
  std::optional<ae::llama::Tokenizer> tokenizer;
  std::string no_tokenizer;

  LlamaServer(const std::string& path, int threads, const ae::serving::PlannerConfig& config)
      : LlamaServer(ae::llama::load_weights(path), path, threads, config) {}
  LlamaServer(const ae::llama::Weights& weights, const std::string& path, int threads,
              const ae::serving::PlannerConfig& config)
      : model(weights), pool(threads), engine(model, pool), planner(model.config(), keyed_by(config, model)) {
    try {
      tokenizer.emplace(ae::llama::model_tokenizer(weights, path));
    } catch (const std::exception& e) {
      no_tokenizer = e.what();
    }
  }
  // K/V blocks in a shared store are keyed by the model's fingerprint, so
  // replicas of one model share them and other models never read them.
  static ae::serving::PlannerConfig keyed_by(ae::serving::PlannerConfig config, const ae::llama::Model& model) {
    if (!config.store_url.empty()) config.model_fingerprint = model.fingerprint();
    return config;
  }
  const ae::llama::Tokenizer& tokens() const {
    if (!tokenizer) throw std::invalid_argument("this model has no tokenizer: " + no_tokenizer);
    return *tokenizer;
  }
};

nb::dict prefill_report(const ae::serving::Plan& plan) {
  static const char* kRoutes[] = {"reuse", "blend", "cache"};
  const ae::serving::PrefillReport& r = plan.report;
  nb::dict d;
  d["route"] = kRoutes[static_cast<int>(plan.route)];
  d["reused"] = r.reused;
  d["reused_exact"] = r.reused_exact;
  d["blend_first_layer_rows"] = r.blend_first_layer;
  d["blend_reused_rows"] = r.blend_reused;
  d["blend_recomputed_rows"] = r.blend_recomputed;
  d["blend_rejected"] = r.blend_rejected;
  d["blend_calibration"] = r.blend_calibration;
  d["calibration_kl"] = r.calibration_kl;
  d["calibration_continuation_kl"] = r.calibration_continuation_kl;
  d["estimated_error"] = r.estimated_error;
  d["blend_deviation"] = r.blend_deviation;
  d["guard_estimate_bound"] = r.blend_bounds.estimate;
  d["guard_deviation_bound"] = r.blend_bounds.deviation;
  d["blend_refused_at_layer"] = r.blend_refused_at_layer;
  d["blend_screened"] = r.blend_screened;
  d["screened_estimate"] = r.screened_estimate;
  d["screened_deviation"] = r.screened_deviation;
  d["screened_refused"] = r.screened_refused;
  d["reused_from_l2"] = r.reused_from_l2;
  return d;
}

NB_MODULE(_core, m) {
  m.doc() = "C++ core of attention_echo (use the attention_echo package, not this module)";
  m.attr("__version__") = AE_VERSION;
#ifdef AE_HAVE_CUDA
  m.attr("has_cuda") = true;  // built with AE_CUDA: the cache takes CUDA tensors
#else
  m.attr("has_cuda") = false;
#endif

  // ---- EchoConfig: plain fields; the Python dataclass EchoConfig fills one. ----
  nb::class_<ae::EchoConfig>(m, "EchoConfig")
      .def(nb::init<>())
      .def_rw("capacity", &ae::EchoConfig::capacity)
      .def_rw("similarity_threshold", &ae::EchoConfig::similarity_threshold)
      .def_rw("max_prefix_length", &ae::EchoConfig::max_prefix_length)
      .def_rw("adjustment_strength", &ae::EchoConfig::adjustment_strength)
      .def_rw("enable_jacobian", &ae::EchoConfig::enable_jacobian)
      .def_rw("hash_dim", &ae::EchoConfig::hash_dim)
      .def_prop_rw(
          "eviction_policy",
          [](const ae::EchoConfig& c) { return std::string(ae::to_string(c.eviction_policy)); },
          [](ae::EchoConfig& c, const std::string& s) { c.eviction_policy = ae::parse_eviction_policy(s); })
      .def_rw("per_layer", &ae::EchoConfig::per_layer)
      .def_rw("max_bytes", &ae::EchoConfig::max_bytes)
      .def_rw("device_max_bytes", &ae::EchoConfig::device_max_bytes)
      .def_prop_rw(
          "mode", [](const ae::EchoConfig& c) { return std::string(ae::to_string(c.mode)); },
          [](ae::EchoConfig& c, const std::string& s) { c.mode = ae::parse_echo_mode(s); })
      .def_rw("max_error", &ae::EchoConfig::max_error)
      .def_rw("verify_rows", &ae::EchoConfig::verify_rows)
      .def_rw("length_tolerance", &ae::EchoConfig::length_tolerance)
      .def_rw("threads", &ae::EchoConfig::threads)
      .def_rw("sparse_mass", &ae::EchoConfig::sparse_mass)
      .def_rw("block_size", &ae::EchoConfig::block_size)
      .def_rw("store_url", &ae::EchoConfig::store_url)
      .def("validate", &ae::EchoConfig::validate);

  // ---- AttentionEchoCache ----
  nb::class_<ae::AttentionEchoCache>(m, "AttentionEchoCache")
      .def(nb::init<ae::EchoConfig>(), "config"_a, nb::call_guard<nb::gil_scoped_release>())
      .def(
          "attention_with_echo",
          [](ae::AttentionEchoCache& self, AnyInArray q, AnyInArray k, AnyInArray v, AnyOutArray out,
             int prefix_length, std::optional<Matrix> prefix_embeddings, int layer_id,
             std::optional<float> scale, bool causal, std::optional<Tokens> prefix_tokens,
             const std::string& name_space, std::uintptr_t stream) {
            const auto qv = heads_view<const void>(q, "query");
            const auto kv = heads_view<const void>(k, "key");
            const auto vv = heads_view<const void>(v, "value");
            const auto ov = heads_view<void>(out, "out");
            ae::EchoRequest req;
            req.prefix_length = prefix_length;
            req.prefix_embeddings = matrix_view(prefix_embeddings, "prefix_embeddings");
            req.layer_id = layer_id;
            req.scale = scale;
            req.causal = causal;
            if (prefix_tokens)
              req.prefix_tokens = std::span<const std::int32_t>(prefix_tokens->data(), prefix_tokens->shape(0));
            req.name_space = name_space;
            req.stream = reinterpret_cast<void*>(stream);
            ae::EchoResult r;
            {
              nb::gil_scoped_release release;
              r = self.attention_with_echo(qv, kv, vv, ov, req);
            }
            return result_dict(r);
          },
          "query"_a.noconvert(), "key"_a.noconvert(), "value"_a.noconvert(), "out"_a.noconvert(),
          "prefix_length"_a, "prefix_embeddings"_a.noconvert().none(), "layer_id"_a,
          "scale"_a.none(), "causal"_a, "prefix_tokens"_a.noconvert().none(), "namespace"_a, "stream"_a = 0)
      .def(
          "compute_semantic_key",
          [](const ae::AttentionEchoCache& self, Matrix emb) {
            const ae::MatrixView view = matrix_view(emb, "embeddings");
            std::vector<float> key;
            {
              nb::gil_scoped_release release;
              key = self.compute_semantic_key(view);
            }
            return to_numpy(std::move(key));
          },
          "embeddings"_a.noconvert())
      .def("stats", [](const ae::AttentionEchoCache& self) { return stats_dict(self.stats(), self.config()); })
      .def("l2_stats", [](const ae::AttentionEchoCache& self) { return l2_stats_dict(self.l2_stats()); })
      .def("size", &ae::AttentionEchoCache::size)
      .def("clear", nb::overload_cast<>(&ae::AttentionEchoCache::clear), nb::call_guard<nb::gil_scoped_release>())
      // Tenants: per-namespace stats and clear.
      .def(
          "namespace_stats",
          [](const ae::AttentionEchoCache& self, const std::string& name_space) {
            return stats_dict(self.stats(name_space), self.config());
          },
          "namespace"_a)
      .def("namespaces", &ae::AttentionEchoCache::namespaces)
      .def(
          "clear_namespace",
          [](ae::AttentionEchoCache& self, const std::string& name_space) { self.clear(name_space); },
          "namespace"_a, nb::call_guard<nb::gil_scoped_release>())
      .def("config", &ae::AttentionEchoCache::config)
      .def("save", &ae::AttentionEchoCache::save, "path"_a, nb::call_guard<nb::gil_scoped_release>())
      .def("load", &ae::AttentionEchoCache::load, "path"_a, nb::call_guard<nb::gil_scoped_release>());

  // ---- plain exact attention (no cache): the baseline the examples compare with ----
  m.def(
      "attention",
      [](InArray q, InArray k, InArray v, OutArray out, std::optional<float> scale, bool causal,
         int prefix_length) {
        const auto qv = ae::as_float(heads_view<const void>(q, "query"));
        const auto kv = ae::as_float(heads_view<const void>(k, "key"));
        const auto vv = ae::as_float(heads_view<const void>(v, "value"));
        const auto ov = ae::as_float(heads_view<void>(out, "out"));
        ae::AttentionOptions opt;
        opt.scale = scale;
        opt.causal = causal;
        opt.prefix_length = prefix_length;
        nb::gil_scoped_release release;
        ae::attention(qv, kv, vv, ov, opt, shared_pool());
      },
      "query"_a.noconvert(), "key"_a.noconvert(), "value"_a.noconvert(), "out"_a.noconvert(),
      "scale"_a.none(), "causal"_a, "prefix_length"_a);

  m.def("attention_isa", &ae::attention_isa);

  // ---- a model served through the prefill planner ----
  nb::class_<LlamaServer>(m, "LlamaServer")
      .def(
          "__init__",
          [](LlamaServer* self, const std::string& path, int threads, bool blend, double recompute_ratio,
             double max_error, std::size_t store_bytes, std::size_t reserve_bytes, const std::string& selection,
             const std::string& store_url) {
            ae::serving::PlannerConfig config;
            config.store_bytes = store_bytes;
            config.reserve_bytes = reserve_bytes;
            config.store_url = store_url;
            config.blend = {.enabled = blend,
                            .selection = ae::serving::parse_blend_selection(selection),
                            .recompute_ratio = recompute_ratio,
                            .max_error = max_error};
            nb::gil_scoped_release release;
            new (self) LlamaServer(path, threads, config);
          },
          "path"_a, "threads"_a, "blend"_a, "recompute_ratio"_a, "max_error"_a, "store_bytes"_a, "reserve_bytes"_a,
          "blend_selection"_a, "store_url"_a)
      .def_prop_ro("vocab_size", [](const LlamaServer& s) { return s.model.config().vocab_size; })
      .def_prop_ro("context_length", [](const LlamaServer& s) { return s.model.config().seq_len; })
      .def_prop_ro("stored_prompts", [](const LlamaServer& s) { return s.planner.stored_prompts(); })
      .def("l2_stats", [](const LlamaServer& s) { return l2_stats_dict(s.planner.l2_stats()); })
      .def(
          "clear_namespace", [](LlamaServer& self, const std::string& name_space) { self.planner.clear(name_space); },
          "namespace"_a, nb::call_guard<nb::gil_scoped_release>())
      .def(
          "prefill",
          [](LlamaServer& self, Tokens tokens, const std::string& name_space) {
            const std::span<const int> ids(tokens.data(), tokens.shape(0));
            ae::serving::Plan plan;
            ae::llama::ForwardResult result;
            {
              nb::gil_scoped_release release;
              plan = self.planner.plan(ids, 0, name_space);
              result = self.planner.execute(self.engine, ids, plan);
            }
            return nb::make_tuple(to_numpy(std::move(result.logits)), prefill_report(plan));
          },
          "tokens"_a.noconvert(), "namespace"_a)
      .def(
          "tokenize",
          [](const LlamaServer& self, const std::string& text) {
            std::vector<int> ids = self.tokens().encode(text);
            return to_numpy(std::vector<std::int32_t>(ids.begin(), ids.end()));
          },
          "text"_a)
      .def(
          "decode",
          [](const LlamaServer& self, Tokens tokens) {
            const ae::llama::Tokenizer& tokenizer = self.tokens();
            std::string text;
            for (std::size_t i = 0; i < tokens.shape(0); ++i) {
              const int id = tokens.data()[i];
              const std::string piece = tokenizer.decode(i > 0 ? tokens.data()[i - 1] : -1, id);  // checks the id
              if (id != tokenizer.bos() && id != tokenizer.eos()) text += piece;
            }
            return nb::bytes(text.data(), text.size());
          },
          "tokens"_a.noconvert())
      .def(
          "calibrate",
          [](LlamaServer& self, const std::vector<std::vector<int>>& passages) {
            std::vector<ae::serving::CalibrationSample> samples;
            {
              nb::gil_scoped_release release;
              samples = self.planner.calibrate(self.engine, passages);
            }
            nb::list out;
            for (const auto& s : samples) {
              nb::dict d;
              d["estimate"] = s.estimate;
              d["kl"] = s.kl;
              d["deviation"] = s.deviation;
              d["continuation_kl"] = s.continuation_kl;
              d["selection"] = std::string(ae::serving::to_string(s.selection));
              out.append(d);
            }
            return out;
          },
          "passages"_a);

  // Test hook: the address nanobind hands to C++ for an array, to check that
  // contiguous float32 inputs cross without a copy.
  m.def("_data_address", [](InArray a) { return reinterpret_cast<std::uintptr_t>(a.data()); },
        "array"_a.noconvert());
}
