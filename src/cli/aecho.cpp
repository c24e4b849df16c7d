// aecho: run the engine from the command line.
//   aecho generate --model M --tokenizer T [--prompt S] [--steps N] [--threads N]
//   aecho logits   --model M (--tokens 1,2,3 | --tokenizer T --prompt S) --out FILE
//   aecho bench    --scenario chatbot|rag|code|near-dup|all [--model M] ...
#include <algorithm>
#include <filesystem>
#include <cstring>
#include <fstream>
#include <iostream>
#include <map>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "attention_echo/attention.hpp"
#include "attention_echo/bench.hpp"
#include "attention_echo/llama.hpp"
#include "engine/gemm.hpp"

namespace ae = attention_echo;
namespace llama = attention_echo::llama;

namespace {

constexpr const char* kUsage =
    "usage:\n"
    "  aecho generate --model M --tokenizer T [--prompt S] [--steps N] [--threads N]\n"
    "  aecho logits --model M (--tokens 1,2,3 | --tokenizer T --prompt S) --out FILE [--threads N]\n"
    "      writes raw float32 logits [tokens, vocab]\n"
    "  aecho bench --scenario chatbot|rag|code|near-dup|all [--model M] [--tokenizer T]\n"
    "      [--heldout FILE] [--mode exact|sparse|dense] [--requests N] [--context N]\n"
    "      [--seed N] [--threads N] [--max-error X] [--sparse-mass X] [--json FILE]\n"
    "      serves every request with no reuse, exact prefix reuse and AttentionEcho;\n"
    "      --context: prompt plus continuation tokens (default: the model's, at most 4096),\n"
    "      --requests: per scenario (default 16), --seed: workload seed (default 1);\n"
    "      --max-error, --sparse-mass: the cache's guard and kept-mass knobs\n"
    "      (defaults 0.05 and 0.98; inf turns the guard off)\n"
    "      the model defaults to the bundled models/echo-llama-6m/model.bin, the\n"
    "      tokenizer and held-out text to tokenizer.bin and heldout.txt beside it\n";

struct UsageError : std::invalid_argument {
  using std::invalid_argument::invalid_argument;
};

// --key value pairs; every key must be one the subcommand knows.
std::map<std::string, std::string> parse_flags(int argc, char** argv, const std::vector<std::string>& known) {
  std::map<std::string, std::string> flags;
  for (int i = 2; i < argc; i += 2) {
    const std::string key = argv[i];
    if (key.rfind("--", 0) != 0 || std::find(known.begin(), known.end(), key.substr(2)) == known.end())
      throw UsageError("unknown option '" + key + "'");
    if (i + 1 >= argc) throw UsageError("option '" + key + "' needs a value");
    flags[key.substr(2)] = argv[i + 1];
  }
  return flags;
}

std::string required(const std::map<std::string, std::string>& flags, const std::string& key) {
  auto it = flags.find(key);
  if (it == flags.end()) throw UsageError("missing --" + key);
  return it->second;
}

int int_flag(const std::map<std::string, std::string>& flags, const std::string& key, int fallback, int min) {
  auto it = flags.find(key);
  if (it == flags.end()) return fallback;
  std::size_t used = 0;
  int value = 0;
  try {
    value = std::stoi(it->second, &used);
  } catch (const std::exception&) {
    used = 0;
  }
  if (used != it->second.size() || value < min)
    throw UsageError("--" + key + " must be an integer >= " + std::to_string(min) + ", got '" + it->second + "'");
  return value;
}

double double_flag(const std::map<std::string, std::string>& flags, const std::string& key, double fallback) {
  auto it = flags.find(key);
  if (it == flags.end()) return fallback;
  std::size_t used = 0;
  double value = 0.0;
  try {
    value = std::stod(it->second, &used);
  } catch (const std::exception&) {
    used = 0;
  }
  if (used != it->second.size()) throw UsageError("--" + key + " must be a number, got '" + it->second + "'");
  return value;
}

std::vector<int> parse_tokens(const std::string& text) {
  std::vector<int> tokens;
  std::size_t pos = 0;
  while (pos <= text.size()) {
    const std::size_t comma = std::min(text.find(',', pos), text.size());
    const std::string item = text.substr(pos, comma - pos);
    std::size_t used = 0;
    try {
      tokens.push_back(std::stoi(item, &used));
    } catch (const std::exception&) {
      used = 0;
    }
    if (item.empty() || used != item.size()) throw UsageError("--tokens must be comma-separated integers, got '" + item + "'");
    pos = comma + 1;
  }
  return tokens;
}

int argmax(const float* v, int n) { return static_cast<int>(std::max_element(v, v + n) - v); }

int cmd_generate(int argc, char** argv) {
  const auto flags = parse_flags(argc, argv, {"model", "tokenizer", "prompt", "steps", "threads"});
  const int steps = int_flag(flags, "steps", 64, 1);
  const int threads = int_flag(flags, "threads", 0, 0);
  const std::string tokenizer_path = required(flags, "tokenizer");
  const llama::Model model(llama::load_weights(required(flags, "model")));
  const llama::Tokenizer tokenizer(tokenizer_path, model.config().vocab_size);
  ae::ThreadPool pool(threads);
  llama::Engine engine(model, pool);
  const auto it = flags.find("prompt");
  std::vector<int> tokens = tokenizer.encode(it == flags.end() ? "" : it->second);
  llama::KVState kv;
  // Greedy decoding: prefill the prompt, then one token at a time.
  llama::ForwardResult r = engine.forward(tokens, kv, {});
  for (std::size_t i = 1; i < tokens.size(); ++i) std::cout << tokenizer.decode(tokens[i - 1], tokens[i]);
  for (int s = 0; s < steps; ++s) {
    const int next = argmax(r.logits.data(), model.config().vocab_size);
    if (next == llama::Tokenizer::kBos || next == llama::Tokenizer::kEos) break;
    std::cout << tokenizer.decode(tokens.back(), next) << std::flush;
    tokens.push_back(next);
    if (kv.length == model.config().seq_len) break;
    r = engine.forward(std::span<const int>(&tokens.back(), 1), kv, {});
  }
  std::cout << "\n";
  return 0;
}

int cmd_logits(int argc, char** argv) {
  const auto flags = parse_flags(argc, argv, {"model", "tokenizer", "tokens", "prompt", "out", "threads"});
  if (flags.count("tokens") == flags.count("prompt")) throw UsageError("give either --tokens or --prompt");
  if (flags.count("prompt") && !flags.count("tokenizer")) throw UsageError("--prompt needs --tokenizer");
  const std::string out_path = required(flags, "out");
  const int threads = int_flag(flags, "threads", 0, 0);
  const llama::Model model(llama::load_weights(required(flags, "model")));
  const std::vector<int> tokens =
      flags.count("tokens")
          ? parse_tokens(flags.at("tokens"))
          : llama::Tokenizer(flags.at("tokenizer"), model.config().vocab_size).encode(flags.at("prompt"));
  ae::ThreadPool pool(threads);
  llama::Engine engine(model, pool);
  llama::KVState kv;
  const llama::ForwardResult r = engine.forward(tokens, kv, {}, -1);
  std::ofstream out(out_path, std::ios::binary);
  out.write(reinterpret_cast<const char*>(r.logits.data()), static_cast<std::streamsize>(r.logits.size() * sizeof(float)));
  if (!out) throw std::runtime_error(out_path + ": write failed");
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
  throw UsageError("no --model given and the bundled " + rel.string() + " was not found");
}

std::string read_text(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw std::runtime_error(path + ": cannot open");
  return {std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>()};
}

void progress_bar(const std::string& label, int done, int total) {
  constexpr int kWidth = 30;
  const int filled = done * kWidth / total;
  std::fprintf(stderr, "\r  %-9s [%s%s] %d/%d", label.c_str(), std::string(filled, '#').c_str(),
               std::string(kWidth - filled, '.').c_str(), done, total);
  if (done == total) std::fputc('\n', stderr);
}

int cmd_bench(int argc, char** argv) {
  const auto flags = parse_flags(argc, argv, {"scenario", "model", "tokenizer", "heldout", "mode", "requests",
                                              "context", "seed", "threads", "json", "max-error", "sparse-mass"});
  const std::string scenario = required(flags, "scenario");
  std::vector<std::string> names = llama::scenario_names();
  if (scenario != "all") {
    if (std::find(names.begin(), names.end(), scenario) == names.end())
      throw UsageError("--scenario must be chatbot, rag, code, near-dup or all, got '" + scenario + "'");
    names = {scenario};
  }
  llama::BenchOptions options;
  try {
    options.mode = ae::parse_echo_mode(flags.count("mode") ? flags.at("mode") : "sparse");
  } catch (const std::invalid_argument& e) {
    throw UsageError(std::string("--") + e.what());
  }
  options.threads = int_flag(flags, "threads", 0, 0);
  options.cache.max_error = double_flag(flags, "max-error", options.cache.max_error);
  options.cache.sparse_mass = double_flag(flags, "sparse-mass", options.cache.sparse_mass);
  try {
    options.cache.validate();
  } catch (const std::invalid_argument& e) {
    std::string what = e.what();  // "sparse_mass must ..." -> "--sparse-mass must ..."
    std::replace(what.begin(), what.begin() + static_cast<std::ptrdiff_t>(what.find(' ')), '_', '-');
    throw UsageError("--" + what);
  }
  const int requests = int_flag(flags, "requests", 16, 1);
  const int seed = int_flag(flags, "seed", 1, 0);
  const std::string model_path = flags.count("model") ? flags.at("model") : bundled_model();
  const auto dir = std::filesystem::path(model_path).parent_path();
  const std::string tok_path = flags.count("tokenizer") ? flags.at("tokenizer") : (dir / "tokenizer.bin").string();
  const std::string held_path = flags.count("heldout") ? flags.at("heldout") : (dir / "heldout.txt").string();

  std::ofstream json;  // opened now: an unwritable path fails before the run, not after
  if (flags.count("json")) {
    json.open(flags.at("json"));
    if (!json) throw std::runtime_error(flags.at("json") + ": cannot open for writing");
  }

  const llama::Model model(llama::load_weights(model_path));
  const llama::Tokenizer tokenizer(tok_path, model.config().vocab_size);
  const std::string heldout = read_text(held_path);
  const int context = int_flag(flags, "context", std::min(model.config().seq_len, 4096), 64);
  if (context > model.config().seq_len)
    throw UsageError("--context must be at most the model's " + std::to_string(model.config().seq_len));
  const int threads = options.threads > 0 ? options.threads : static_cast<int>(std::thread::hardware_concurrency());
  std::printf("aecho bench: %s (dim %d, %d layers, %d/%d heads), context %d, echo mode %s, seed %d,\n"
              "  %d requests per scenario, %d threads, SIMD path %s\n\n",
              model_path.c_str(), model.config().dim, model.config().n_layers, model.config().n_heads,
              model.config().n_kv_heads, context, std::string(ae::to_string(options.mode)).c_str(), seed, requests,
              threads, ae::attention_isa());
  std::fflush(stdout);

  std::vector<llama::ScenarioReport> reports;
  for (const auto& name : names) {
    const llama::Scenario s = llama::make_scenario(name, heldout, tokenizer, context, requests, seed);
    reports.push_back(llama::run_scenario(model, s, options, [&](int done, int total) { progress_bar(name, done, total); }));
    std::cout << llama::format_report(reports.back()) << "\n" << std::flush;
  }
  if (json.is_open()) {
    const std::string meta = "\"model\": " + llama::json_string(model_path) + ", \"mode\": " +
                             llama::json_string(ae::to_string(options.mode)) + ", \"context\": " +
                             std::to_string(context) + ", \"seed\": " + std::to_string(seed) +
                             ", \"threads\": " + std::to_string(threads) +
                             ", \"attention_isa\": " + llama::json_string(ae::attention_isa()) +
                             ", \"gemm_isa\": " + llama::json_string(ae::attention_isa());
    json << llama::reports_to_json(reports, meta);
    if (!json.flush()) throw std::runtime_error(flags.at("json") + ": write failed");
  }
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 2 || !std::strcmp(argv[1], "--help") || !std::strcmp(argv[1], "-h")) {
    std::cerr << kUsage;
    return argc < 2 ? 2 : 0;
  }
  const std::string command = argv[1];
  try {
    if (command == "generate") return cmd_generate(argc, argv);
    if (command == "logits") return cmd_logits(argc, argv);
    if (command == "bench") return cmd_bench(argc, argv);
    throw UsageError("unknown command '" + command + "'");
  } catch (const UsageError& e) {
    std::cerr << "aecho: " << e.what() << "\n" << kUsage;
    return 2;
  } catch (const std::exception& e) {
    std::cerr << "aecho: " << e.what() << "\n";
    return 1;
  }
}
