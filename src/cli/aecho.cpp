// aecho: run the engine from the command line.
//   aecho generate --model M --tokenizer T [--prompt S] [--steps N] [--threads N]
//   aecho logits   --model M [--tokenizer T] --tokens 1,2,3 --out FILE [--threads N]
//   aecho bench    --scenario chatbot|rag|code|near-dup|all [--model M] ...
#include <algorithm>
#include <cstring>
#include <fstream>
#include <iostream>
#include <map>
#include <stdexcept>
#include <string>
#include <vector>

#include "attention_echo/llama.hpp"

namespace ae = attention_echo;
namespace llama = attention_echo::llama;

namespace {

constexpr const char* kUsage =
    "usage:\n"
    "  aecho generate --model M --tokenizer T [--prompt S] [--steps N] [--threads N]\n"
    "  aecho logits --model M [--tokenizer T] --tokens 1,2,3 --out FILE [--threads N]\n"
    "      writes raw float32 logits [tokens, vocab]\n";

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
  const llama::Model model(llama::load_weights(required(flags, "model")));
  const llama::Tokenizer tokenizer(required(flags, "tokenizer"), model.config().vocab_size);
  const int steps = int_flag(flags, "steps", 64, 1);
  ae::ThreadPool pool(int_flag(flags, "threads", 0, 0));
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
  const auto flags = parse_flags(argc, argv, {"model", "tokenizer", "tokens", "out", "threads"});
  const llama::Model model(llama::load_weights(required(flags, "model")));
  if (flags.count("tokenizer")) llama::Tokenizer(flags.at("tokenizer"), model.config().vocab_size);  // validates it
  const std::vector<int> tokens = parse_tokens(required(flags, "tokens"));
  const std::string out_path = required(flags, "out");
  ae::ThreadPool pool(int_flag(flags, "threads", 0, 0));
  llama::Engine engine(model, pool);
  llama::KVState kv;
  const llama::ForwardResult r = engine.forward(tokens, kv, {}, -1);
  std::ofstream out(out_path, std::ios::binary);
  out.write(reinterpret_cast<const char*>(r.logits.data()), static_cast<std::streamsize>(r.logits.size() * sizeof(float)));
  if (!out) throw std::runtime_error(out_path + ": write failed");
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
    throw UsageError("unknown command '" + command + "'");
  } catch (const UsageError& e) {
    std::cerr << "aecho: " << e.what() << "\n" << kUsage;
    return 2;
  } catch (const std::exception& e) {
    std::cerr << "aecho: " << e.what() << "\n";
    return 1;
  }
}
