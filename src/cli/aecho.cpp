// aecho: run the engine from the command line.
//   aecho generate --model M [--tokenizer T] [--prompt S] [--steps N] [--threads N]
//   aecho logits   --model M (--tokens 1,2,3 | [--tokenizer T] --prompt S) --out FILE
//   aecho bench    --scenario chatbot|rag|code|near-dup|all [--model M] [--store redis://H:P] ...
// `aecho --help` and `aecho COMMAND --help` print the full usage.
#include <CLI/CLI.hpp>

#include <algorithm>
#include <chrono>
#include <climits>
#include <cstdio>
#include <cstdlib>
#include <ctime>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <optional>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include <nlohmann/json.hpp>

#include "attention_echo/attention.hpp"
#include "attention_echo/l2_store.hpp"
#include "attention_echo/llama.hpp"
#include "cli/bench.hpp"

namespace ae = attention_echo;
namespace llama = attention_echo::llama;

namespace {

struct GenerateArgs {
  std::string model, tokenizer, prompt;
  int steps = 64;
  int threads = 0;
};

struct LogitsArgs {
  std::string model, tokenizer, prompt, out;
  std::vector<int> tokens;
  int threads = 0;
};

struct TokenizeArgs {
  std::string model, tokenizer, prompt;
};

struct BenchArgs {
  std::string scenario, model, tokenizer, heldout, json;
  std::string mode = "sparse";
  int requests = 16;
  int context = 0;  // 0: the model's, at most 4096
  int seed = 1;
  int threads = 0;
  int repeats = ae::bench::kDefaultRepeats;  // 1 with --store unless given
  double max_error = ae::EchoConfig{}.max_error;
  double sparse_mass = ae::EchoConfig{}.sparse_mass;
  bool blend = true;
  double recompute_ratio = ae::serving::BlendConfig{}.recompute_ratio;
  std::string blend_selection{ae::serving::to_string(ae::serving::BlendConfig{}.selection)};
  double blend_max_error = ae::serving::BlendConfig{}.max_error;
  double blend_max_kl = ae::serving::BlendConfig{}.max_kl;
  double blend_max_continuation_kl = ae::serving::BlendConfig{}.max_continuation_kl;
  std::string store;
};

constexpr const char* kTokenizerHelp =
    "llama2.c tokenizer.bin (default: the one a GGUF model carries, else tokenizer.bin beside the model)";

constexpr const char* kBenchFooter =
    "Serves every request with no reuse, exact prefix reuse and AttentionEcho.\n"
    "The model defaults to the bundled models/echo-llama-6m/model.bin, the held-out\n"
    "text to heldout.txt beside the model.\n"
    "Held-out text: plain text, or documents each introduced by a line\n"
    "  #### FILE: name ####\n"
    "(names under pydoc_topics/ or ending in .txt are prose, the rest code);\n"
    "documents under 40 lines are skipped.";

int argmax(const float* v, int n) { return static_cast<int>(std::max_element(v, v + n) - v); }

// llama::model_tokenizer, its errors naming the flag that would mend them.
llama::Tokenizer cli_tokenizer(const llama::Weights& w, const std::string& model_path, const std::string& given) {
  try {
    return llama::model_tokenizer(w, model_path, given);
  } catch (const std::invalid_argument& e) {
    throw CLI::ValidationError("--tokenizer", e.what());
  }
}

struct LoadedModel {
  llama::Model model;
  std::optional<llama::Tokenizer> tokenizer;
};

// The model, and its tokenizer (cli_tokenizer) when `tokenize`; the
// checkpoint's fp32 weights are dropped once the model has repacked them.
LoadedModel load_model(const std::string& model_path, const std::string& tokenizer_path, bool tokenize) {
  const llama::Weights weights = llama::load_weights(model_path);
  std::optional<llama::Tokenizer> tokenizer;
  if (tokenize) tokenizer.emplace(cli_tokenizer(weights, model_path, tokenizer_path));
  return {llama::Model(weights), std::move(tokenizer)};
}

int run_generate(const GenerateArgs& a) {
  const LoadedModel loaded = load_model(a.model, a.tokenizer, true);
  const llama::Model& model = loaded.model;
  const llama::Tokenizer& tokenizer = *loaded.tokenizer;
  ae::ThreadPool pool(a.threads);
  llama::Engine engine(model, pool);
  std::vector<int> tokens = tokenizer.encode(a.prompt);
  if (tokens.empty()) throw CLI::ValidationError("--prompt", "empty, and this vocabulary starts no prompt with BOS");
  llama::KVState kv;
  // Greedy decoding: prefill the prompt, then one token at a time.
  llama::ForwardResult r = engine.forward(tokens, kv, {});
  for (std::size_t i = tokens[0] == tokenizer.bos() ? 1 : 0; i < tokens.size(); ++i)
    std::cout << tokenizer.decode(i > 0 ? tokens[i - 1] : -1, tokens[i]);
  for (int s = 0; s < a.steps; ++s) {
    const int next = argmax(r.logits.data(), model.config().vocab_size);
    if (next == tokenizer.bos() || next == tokenizer.eos()) break;
    std::cout << tokenizer.decode(tokens.back(), next) << std::flush;
    tokens.push_back(next);
    if (kv.length == model.config().seq_len) break;
    r = engine.forward(std::span<const int>(&tokens.back(), 1), kv, {});
  }
  std::cout << "\n";
  return 0;
}

int run_logits(const LogitsArgs& a) {
  if (a.tokens.empty() == a.prompt.empty()) throw CLI::ValidationError("--tokens/--prompt", "give one of them");
  const LoadedModel loaded = load_model(a.model, a.tokenizer, a.tokens.empty());
  const llama::Model& model = loaded.model;
  const std::vector<int> tokens = a.tokens.empty() ? loaded.tokenizer->encode(a.prompt) : a.tokens;
  ae::ThreadPool pool(a.threads);
  llama::Engine engine(model, pool);
  llama::KVState kv;
  const llama::ForwardResult r = engine.forward(tokens, kv, {}, -1);
  std::ofstream out(a.out, std::ios::binary);
  out.write(reinterpret_cast<const char*>(r.logits.data()), static_cast<std::streamsize>(r.logits.size() * sizeof(float)));
  if (!out) throw std::runtime_error(a.out + ": write failed");
  return 0;
}

// The prompt's token ids as the model reads it, comma-separated on stdout.
int run_tokenize(const TokenizeArgs& a) {
  const llama::Weights weights = llama::load_weights(a.model);
  const std::vector<int> ids = cli_tokenizer(weights, a.model, a.tokenizer).encode(a.prompt);
  for (std::size_t i = 0; i < ids.size(); ++i) std::cout << (i ? "," : "") << ids[i];
  std::cout << "\n";
  return 0;
}

// The bundled model, looked for above the working directory and above the
// executable (a build directory inside the repository).
std::string bundled_model() {
  const std::filesystem::path rel = "models/echo-llama-6m/model.bin";
  std::vector<std::filesystem::path> starts = {std::filesystem::current_path()};
  std::error_code ec;
  const auto exe = std::filesystem::read_symlink("/proc/self/exe", ec);
  if (!ec) starts.push_back(exe.parent_path());
  for (auto dir : starts)
    for (int up = 0; up < 4 && !dir.empty(); ++up, dir = dir.parent_path())
      if (std::filesystem::exists(dir / rel)) return (dir / rel).string();
  throw CLI::ValidationError("--model", "not given and the bundled " + rel.string() + " was not found");
}

std::string read_text(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw std::runtime_error(path + ": cannot open");
  return {std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>()};
}

// The CPU's model name (Linux's /proc/cpuinfo; "unknown" elsewhere): every
// figure is quoted with the machine it was measured on.
std::string cpu_model() {
  std::ifstream in("/proc/cpuinfo");
  for (std::string line; std::getline(in, line);) {
    const std::size_t colon = line.find(':');
    if (line.rfind("model name", 0) != 0 || colon == std::string::npos) continue;
    const std::size_t value = line.find_first_not_of(" \t", colon + 1);
    if (value != std::string::npos) return line.substr(value);
  }
  return "unknown";
}

std::string utc_now() {
  const std::time_t now = std::chrono::system_clock::to_time_t(std::chrono::system_clock::now());
  char text[32];
  std::strftime(text, sizeof text, "%Y-%m-%dT%H:%M:%SZ", std::gmtime(&now));
  return text;
}

void progress_bar(const std::string& label, int done, int total) {
  constexpr int kWidth = 30;
  const int filled = done * kWidth / total;
  std::fprintf(stderr, "\r  %-9s [%s%s] %d/%d", label.c_str(), std::string(filled, '#').c_str(),
               std::string(kWidth - filled, '.').c_str(), done, total);
  if (done == total) std::fputc('\n', stderr);
}

// The bench's options from the flags; a value the cache's own validation
// refuses is reported under the flag that set it.
ae::bench::BenchOptions bench_options(const BenchArgs& a) {
  ae::bench::BenchOptions options;
  options.mode = ae::parse_echo_mode(a.mode);
  options.threads = a.threads;
  options.repeats = a.repeats;
  options.cache.max_error = a.max_error;
  options.cache.sparse_mass = a.sparse_mass;
  options.blend = {.enabled = a.blend,
                   .selection = ae::serving::parse_blend_selection(a.blend_selection),
                   .recompute_ratio = a.recompute_ratio,
                   .max_error = a.blend_max_error,
                   .max_kl = a.blend_max_kl,
                   .max_continuation_kl = a.blend_max_continuation_kl};
  options.store_url = a.store;
  if (!a.store.empty() && a.repeats > 1)
    throw CLI::ValidationError("--repeats", "must be 1 with --store (the serving stacks would share it)");
  if (!a.store.empty()) {
    try {
      ae::parse_l2_url(a.store, "--store");
    } catch (const std::invalid_argument& e) {
      throw CLI::ValidationError(e.what());
    }
  }
  try {
    options.cache.validate();
  } catch (const std::invalid_argument& e) {
    const std::string what = e.what();  // "sparse_mass must ..." -> "--sparse-mass: must ..."
    std::string flag = "--" + what.substr(0, what.find(' '));
    std::replace(flag.begin(), flag.end(), '_', '-');
    throw CLI::ValidationError(flag, what.substr(std::min(what.size(), what.find(' ') + 1)));
  }
  return options;
}

int run_bench(const BenchArgs& a) {
  const ae::bench::BenchOptions options = bench_options(a);
  std::vector<std::string> names = ae::bench::scenario_names();
  if (a.scenario != "all") names = {a.scenario};
  const std::string model_path = a.model.empty() ? bundled_model() : a.model;
  const auto dir = std::filesystem::path(model_path).parent_path();
  const std::string held_path = a.heldout.empty() ? (dir / "heldout.txt").string() : a.heldout;
  if (!std::filesystem::exists(held_path)) {
    const char* why = a.heldout.empty() ? " (no held-out text beside the model)" : "";
    throw CLI::ValidationError("--heldout", held_path + " does not exist" + why);
  }

  std::ofstream json;  // opened now: an unwritable path fails before the run, not after
  if (!a.json.empty()) {
    json.open(a.json);
    if (!json) throw std::runtime_error(a.json + ": cannot open for writing");
  }

  const LoadedModel loaded = load_model(model_path, a.tokenizer, true);
  const llama::Model& model = loaded.model;
  const llama::Tokenizer& tokenizer = *loaded.tokenizer;
  const std::string heldout = read_text(held_path);
  const int context = a.context > 0 ? a.context : std::min(model.config().seq_len, 4096);
  if (context > model.config().seq_len)
    throw CLI::ValidationError("--context", "must be at most the model's " + std::to_string(model.config().seq_len));
  const int threads = options.threads > 0 ? options.threads : static_cast<int>(std::thread::hardware_concurrency());
  const std::string mode(ae::to_string(options.mode));
  const std::string cpu = cpu_model(), started = utc_now();
  const unsigned hardware_threads = std::thread::hardware_concurrency();
  std::printf("aecho bench: %s (dim %d, %d layers, %d/%d heads), context %d, echo mode %s, seed %d,\n"
              "  %d requests per scenario, each timed on %d serving stacks, %d threads, SIMD path %s\n"
              "  %s, %u hardware threads, started %s\n\n",
              model_path.c_str(), model.config().dim, model.config().n_layers, model.config().n_heads,
              model.config().n_kv_heads, context, mode.c_str(), a.seed, a.requests, options.repeats, threads,
              ae::attention_isa(), cpu.c_str(), hardware_threads, started.c_str());
  std::fflush(stdout);

  const ae::bench::CalibrationReport calibration =
      ae::bench::calibrate_blend(model, ae::bench::calibration_passages(heldout, tokenizer, context, a.seed), options);
  if (calibration.ran) {
    std::printf("blend guard calibrated before serving in %.2f s:", calibration.seconds);
    for (const auto& s : calibration.samples)
      std::printf(" (estimate %.3f, KL %.1e; deviation %.3f, continuation KL %.1e)", s.estimate, s.kl, s.deviation,
                  s.continuation_kl);
    std::printf(" -> thresholds: estimate %.3f, deviation %.3f; a blend costs %.2fx what its rows predict\n\n",
                calibration.threshold.estimate, calibration.threshold.deviation, calibration.blend_cost_factor);
    std::fflush(stdout);
  }

  std::vector<ae::bench::ScenarioReport> reports;
  for (const auto& name : names) {
    const auto s = ae::bench::make_scenario(name, heldout, tokenizer, context, a.requests, a.seed);
    reports.push_back(
        ae::bench::run_scenario(model, s, options, [&](int done, int total) { progress_bar(name, done, total); }));
    std::cout << ae::bench::format_report(reports.back()) << "\n" << std::flush;
  }
  if (json.is_open()) {
    nlohmann::ordered_json meta = {{"model", model_path},     {"mode", mode},
                                         {"context", context},      {"seed", a.seed},
                                         {"threads", threads},      {"repeats", options.repeats},
                                         {"attention_isa", ae::attention_isa()},
                                         {"gemm_isa", ae::attention_isa()},
                                         {"blend_selection", ae::serving::to_string(options.blend.selection)},
                                         {"blend_calibration", ae::bench::to_json(calibration)},
                                         {"machine", {{"cpu", cpu}, {"hardware_threads", hardware_threads}}},
                                         {"started_utc", started}};
    if (!a.store.empty()) meta["store"] = a.store;
    json << ae::bench::reports_to_json(reports, meta).dump() << "\n";
    if (!json.flush()) throw std::runtime_error(a.json + ": write failed");
  }
  return 0;
}

// The names the library's parse_echo_mode accepts.
// Accepts what `parse` (one of the library's name parsers) accepts; its
// error is the message.
template <typename Parse>
CLI::Validator parse_check(Parse parse, std::string description) {
  return CLI::Validator(
      [parse](std::string& text) {
        try {
          parse(text);
          return std::string();
        } catch (const std::invalid_argument& e) {
          return std::string(e.what());
        }
      },
      std::move(description));
}

void add_threads(CLI::App& cmd, int& threads) {
  cmd.add_option("--threads", threads, "worker threads (0: all hardware threads)")
      ->check(CLI::NonNegativeNumber)
      ->default_str("0");
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app("aecho: the AttentionEcho inference engine from the command line", "aecho");
  app.get_formatter()->label("Usage", "usage");
  app.require_subcommand(1);

  GenerateArgs gen;
  CLI::App& generate = *app.add_subcommand("generate", "greedy decoding from a prompt");
  generate.add_option("--model", gen.model, "llama2.c .bin or GGUF checkpoint")->required();
  generate.add_option("--tokenizer", gen.tokenizer, kTokenizerHelp);
  generate.add_option("--prompt", gen.prompt, "text to continue (default: empty)");
  generate.add_option("--steps", gen.steps, "tokens to generate")->check(CLI::PositiveNumber)->capture_default_str();
  add_threads(generate, gen.threads);

  LogitsArgs lg;
  CLI::App& logits = *app.add_subcommand("logits", "write raw float32 logits [tokens, vocab] of every prompt row");
  logits.add_option("--model", lg.model, "llama2.c .bin or GGUF checkpoint")->required();
  CLI::Option* tokens = logits.add_option("--tokens", lg.tokens, "comma-separated token ids, e.g. 1,2,3")
                            ->delimiter(',')
                            ->expected(1, INT_MAX);
  CLI::Option* prompt = logits.add_option("--prompt", lg.prompt, "text, encoded with the model's tokenizer");
  logits.add_option("--tokenizer", lg.tokenizer, kTokenizerHelp);
  tokens->excludes(prompt);
  logits.add_option("--out", lg.out, "output file")->required();
  add_threads(logits, lg.threads);

  TokenizeArgs tk;
  CLI::App& tokenize = *app.add_subcommand("tokenize", "print a prompt's token ids as the model reads it");
  tokenize.add_option("--model", tk.model, "llama2.c .bin or GGUF checkpoint")->required();
  tokenize.add_option("--tokenizer", tk.tokenizer, kTokenizerHelp);
  tokenize.add_option("--prompt", tk.prompt, "text")->required();

  BenchArgs bn;
  std::vector<std::string> scenarios = ae::bench::scenario_names();
  scenarios.push_back("all");
  CLI::App& bench = *app.add_subcommand("bench", "the serving benchmark on scenario workloads");
  bench.add_option("--scenario", bn.scenario, "workload")->required()->check(CLI::IsMember(scenarios));
  bench.add_option("--model", bn.model, "checkpoint (default: the bundled model)");
  bench.add_option("--tokenizer", bn.tokenizer, kTokenizerHelp);
  bench.add_option("--heldout", bn.heldout, "held-out text the requests are cut from (default: heldout.txt beside the model)");
  bench.add_option("--mode", bn.mode, "the echo cache's mode: off|sparse|dense (\"exact\" is accepted for off)")
      ->check(parse_check(ae::parse_echo_mode, "MODE"))
      ->capture_default_str();
  bench.add_option("--requests", bn.requests, "requests per scenario")->check(CLI::PositiveNumber)->capture_default_str();
  bench.add_option("--context", bn.context, "prompt plus continuation tokens (default: the model's, at most 4096)")
      ->check(CLI::Range(64, INT_MAX).description("INT >= 64"));
  bench.add_option("--seed", bn.seed, "workload seed")->check(CLI::NonNegativeNumber)->capture_default_str();
  add_threads(bench, bn.threads);
  CLI::Option* repeats =
      bench.add_option("--repeats", bn.repeats,
                       "serving stacks each request is served on; its time in a mode is their median "
                       "(1 with --store, which they would share)")
          ->check(CLI::PositiveNumber)
          ->capture_default_str();
  bench.add_option("--max-error", bn.max_error, "the cache's guard: max relative error of a served hit (inf: off)")
      ->capture_default_str();
  bench.add_option("--sparse-mass", bn.sparse_mass, "attention mass the sparse tier's kept tiles cover")
      ->capture_default_str();
  bench.add_flag("!--no-blend", bn.blend, "echo mode without the KV-blend tier");
  bench.add_option("--recompute-ratio", bn.recompute_ratio, "KV blend: aligned rows recomputed per layer")
      ->check(CLI::Range(0.0, 1.0))
      ->capture_default_str();
  bench.add_option("--blend-selection", bn.blend_selection,
                   "KV blend: the rows recomputed, by run start, deviation, or auto (run start unless text moved)")
      ->check(parse_check(ae::serving::parse_blend_selection, "SELECTION"))
      ->capture_default_str();
  bench.add_option("--blend-max-error", bn.blend_max_error,
                   "KV blend's guard: max K/V deviation of reused rows and max estimate (inf: off)")
      ->check(CLI::Validator(
          [](std::string& text) {
            const double x = std::strtod(text.c_str(), nullptr);
            return x >= 0.0 ? std::string() : "must be >= 0 (inf: off), got " + text;
          },
          "FLOAT >= 0"))
      ->capture_default_str();
  bench.add_option("--blend-max-kl", bn.blend_max_kl,
                   "KV blend's calibrated guard: next-token KL (nats) it aims under")
      ->check(CLI::PositiveNumber)
      ->capture_default_str();
  bench.add_option("--blend-max-continuation-kl", bn.blend_max_continuation_kl,
                   "KV blend's calibrated guard: mean KL (nats) of the prompt's last rows it aims under")
      ->check(CLI::PositiveNumber)
      ->capture_default_str();
  bench.add_option("--json", bn.json, "also write every figure as JSON to this file");
  bench.add_option("--store", bn.store,
                   "echo mode's shared L2 store, redis://HOST:PORT[?deadline_ms=3&...]: K/V blocks and cache "
                   "entries are written through and read by other processes running the same scenario");
  bench.footer(kBenchFooter);

  try {
    app.parse(argc, argv);
    if (!bn.store.empty() && repeats->count() == 0) bn.repeats = 1;
    if (generate.parsed()) return run_generate(gen);
    if (logits.parsed()) return run_logits(lg);
    if (tokenize.parsed()) return run_tokenize(tk);
    return run_bench(bn);
  } catch (const CLI::CallForHelp& e) {
    return app.exit(e);
  } catch (const CLI::ParseError& e) {
    // A bad command line, found by CLI11 or after parsing: the usage of the
    // subcommand it was for (help() picks it).
    std::cerr << "aecho: " << e.what() << "\n" << app.help();
    return 2;
  } catch (const std::exception& e) {
    std::cerr << "aecho: " << e.what() << "\n";
    return 1;
  }
}
