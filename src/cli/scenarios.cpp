// Scenario workloads from held-out text. Prompts are concatenations of
// separately tokenised segments (lines, passages), so a segment two requests
// share is the same token run in both, whatever surrounds it: shared context
// is shared tokens, as in a real application that caches its prompt pieces.
//
// Randomness is std::mt19937_64's raw output (fixed by the standard), never a
// <random> distribution (implementation-defined), so every platform builds
// the same requests.
#include <algorithm>
#include <random>
#include <stdexcept>

#include "cli/bench.hpp"

namespace attention_echo::bench {
namespace {

// Tiny documents make no context; keep those with some substance.
constexpr std::size_t kMinLines = 40;

struct Document {
  std::string name;
  std::vector<std::string> lines;  // each with its '\n'
  bool prose = false;              // documentation rather than code
};

// Each line of `text` with its '\n'.
std::vector<std::string_view> split_lines(std::string_view text) {
  std::vector<std::string_view> lines;
  for (std::size_t pos = 0; pos < text.size();) {
    const std::size_t end = std::min(text.find('\n', pos), text.size() - 1) + 1;
    lines.push_back(text.substr(pos, end - pos));
    pos = end;
  }
  return lines;
}

// Held-out text cut at "#### FILE: name ####" lines into documents; text
// without such a line is one plain-text document.
std::vector<Document> split_documents(std::string_view text) {
  constexpr std::string_view kMarker = "#### FILE: ";
  const std::vector<std::string_view> lines = split_lines(text);
  const bool sectioned =
      std::any_of(lines.begin(), lines.end(), [&](std::string_view line) { return line.starts_with(kMarker); });
  std::vector<Document> docs;
  if (!sectioned) docs.push_back({"text", {}, true});
  for (std::string_view line : lines) {
    if (sectioned && line.starts_with(kMarker)) {
      Document d;
      d.name = std::string(line.substr(kMarker.size(), line.find(" ####") - kMarker.size()));
      d.prose = d.name.starts_with("pydoc_topics/") || d.name.ends_with(".txt");
      docs.push_back(std::move(d));
    } else if (!docs.empty()) {
      docs.back().lines.emplace_back(line);
    }
  }
  std::erase_if(docs, [](const Document& d) { return d.lines.size() < kMinLines; });
  if (docs.empty())
    throw std::invalid_argument("heldout: no document of " + std::to_string(kMinLines) +
                                "+ lines (plain text, or sections each introduced by '#### FILE: name ####')");
  return docs;
}

class Builder {
 public:
  Builder(std::string_view heldout, const llama::Tokenizer& tokenizer, int context, std::uint64_t seed)
      : docs_(split_documents(heldout)), tok_(tokenizer), rng_(seed) {
    // Room for the continuation: 1/8 of the context, at most 64 tokens.
    continuation_ = std::clamp(context / 8, 4, 64);
    budget_ = context - continuation_;
  }

  std::uint64_t pick(std::uint64_t n) { return rng_() % n; }

  std::vector<int> encode(std::string_view text) const {
    return tok_.encode(text, {.bos = false, .eos = false, .dummy_prefix = false});
  }

  // Lines of `doc` from `first` until `max_tokens` would be exceeded.
  std::vector<int> lines(const Document& doc, std::size_t first, int max_tokens, std::size_t* next = nullptr) const {
    std::vector<int> out;
    std::size_t i = first;
    for (; i < doc.lines.size(); ++i) {
      const auto t = encode(doc.lines[i]);
      if (static_cast<int>(out.size() + t.size()) > max_tokens) break;
      out.insert(out.end(), t.begin(), t.end());
    }
    if (next) *next = i;
    return out;
  }

  // The first n tokens of the text from line `first` on (fewer at the end).
  std::vector<int> text_after(const Document& doc, std::size_t first, int n) const {
    std::vector<int> out;
    for (std::size_t i = first; i < doc.lines.size() && static_cast<int>(out.size()) < n; ++i) {
      const auto t = encode(doc.lines[i]);
      out.insert(out.end(), t.begin(), t.end());
    }
    out.resize(std::min<std::size_t>(out.size(), n));
    return out;
  }

  // A document (prose first when asked) with at least `min_lines` lines,
  // never one in `used`.
  const Document& document(bool prefer_prose, std::size_t min_lines, std::vector<const Document*>& used) {
    std::vector<const Document*> pool;
    for (int pass = 0; pass < 2 && pool.empty(); ++pass)
      for (const auto& d : docs_)
        if ((pass == 1 || d.prose == prefer_prose) && d.lines.size() >= min_lines &&
            std::find(used.begin(), used.end(), &d) == used.end())
          pool.push_back(&d);
    if (pool.empty()) pool.push_back(&docs_[pick(docs_.size())]);  // small corpus: reuse
    used.push_back(pool[pick(pool.size())]);
    return *used.back();
  }

  // A short real question-like line (a comment, docstring or statement of
  // 20-100 bytes) and the real text after it, as the reference continuation.
  std::pair<std::string, std::vector<int>> question_text() {
    for (int attempt = 0; attempt < 100000; ++attempt) {
      const Document& d = docs_[pick(docs_.size())];
      const std::size_t i = pick(d.lines.size() - 8);
      std::string line = d.lines[i];
      const auto start = line.find_first_not_of(" \t#");
      if (start == std::string::npos || line.size() - start < 20 || line.size() - start > 100) continue;
      std::vector<int> cont = text_after(d, i + 1, continuation_);
      if (static_cast<int>(cont.size()) < continuation_ / 2) continue;
      return {line.substr(start), std::move(cont)};
    }
    throw std::invalid_argument("heldout: no line of 20-100 bytes followed by text to use as a question");
  }
  std::pair<std::vector<int>, std::vector<int>> question() {
    auto [text, cont] = question_text();
    return {encode(text), std::move(cont)};
  }

  int budget() const { return budget_; }
  int continuation() const { return continuation_; }

 private:
  std::vector<Document> docs_;
  const llama::Tokenizer& tok_;
  std::mt19937_64 rng_;
  int budget_ = 0;
  int continuation_ = 0;
};

void append(std::vector<int>& out, const std::vector<int>& part) { out.insert(out.end(), part.begin(), part.end()); }

// Trims a prompt that outgrew the budget (tiny contexts only) from the end;
// at least one row after the prefix stays.
ScenarioRequest finish(std::vector<int> prompt, int prefix, std::vector<int> continuation, int budget) {
  if (static_cast<int>(prompt.size()) > budget) prompt.resize(budget);
  const int p = std::min(prefix, static_cast<int>(prompt.size()) - 1);
  return {std::move(prompt), p, std::move(continuation)};
}

// A request whose shared context is all of `prompt`: a real question-like
// line follows between `before` and `after`, the text after that line in its
// document is the reference continuation.
ScenarioRequest ask(Builder& b, std::vector<int> prompt, std::string_view before, std::string_view after) {
  const int prefix = static_cast<int>(prompt.size());
  auto [q, cont] = b.question();
  append(prompt, b.encode(before));
  append(prompt, q);
  append(prompt, b.encode(after));
  return finish(std::move(prompt), prefix, std::move(cont), b.budget());
}

// A few long system prompts (documentation as the assistant's reference),
// many short user turns.
Scenario chatbot(Builder& b, int requests) {
  Scenario s{"chatbot", "3 long system prompts (documentation), short user turns", {}};
  std::vector<std::vector<int>> systems;
  std::vector<const Document*> used;
  for (int i = 0; i < 3; ++i) {
    std::vector<int> sys = b.encode("System: You are a Python assistant. Use the reference below.\n\n");
    const int want = b.budget() * (60 + static_cast<int>(b.pick(20))) / 100;
    append(sys, b.lines(b.document(true, 40, used), 0, want - static_cast<int>(sys.size())));
    systems.push_back(std::move(sys));
  }
  for (int r = 0; r < requests; ++r)
    s.requests.push_back(ask(b, systems[b.pick(systems.size())], "\n\nUser: ", "Assistant:"));
  return s;
}

// `count` passages of a fifth of the budget each from distinct code
// documents, each under a "[name]" line, as a retriever returns them.
std::vector<std::vector<int>> retrieved_passages(Builder& b, int count) {
  const int passage_tokens = b.budget() / 5;
  std::vector<std::vector<int>> passages;
  std::vector<const Document*> used;
  for (int i = 0; i < count; ++i) {
    const Document& d = b.document(false, 60, used);
    std::vector<int> p = b.encode("[" + d.name + "]\n");
    append(p, b.lines(d, b.pick(d.lines.size() / 2), passage_tokens - static_cast<int>(p.size())));
    append(p, b.encode("\n"));
    passages.push_back(std::move(p));
  }
  return passages;
}

// Retrieved passages shared across questions: the same four, reordered, or
// with one swapped for another passage.
Scenario rag(Builder& b, int requests) {
  Scenario s{"rag", "4 retrieved passages per question from 2 topics; 25% reordered, 25% one passage swapped", {}};
  // topic t: base 6t..6t+3, alternates 6t+4, 6t+5
  const std::vector<std::vector<int>> passages = retrieved_passages(b, 12);
  for (int r = 0; r < requests; ++r) {
    const int topic = static_cast<int>(b.pick(2));
    std::vector<int> chosen = {6 * topic, 6 * topic + 1, 6 * topic + 2, 6 * topic + 3};
    const int variant = static_cast<int>(b.pick(4));
    if (variant == 0) {
      for (std::size_t i = chosen.size() - 1; i > 0; --i) std::swap(chosen[i], chosen[b.pick(i + 1)]);
    } else if (variant == 1) {
      chosen[b.pick(4)] = 6 * topic + 4 + static_cast<int>(b.pick(2));
    }
    std::vector<int> prompt = b.encode("Answer the question using these passages.\n\n");
    for (int c : chosen) append(prompt, passages[c]);
    s.requests.push_back(ask(b, std::move(prompt), "Question: ", "Answer:"));
  }
  return s;
}

// One small edit at a random line, as a user makes between two requests:
// a changed (or added) number, an inserted line, a deleted line, or none.
void edit_one_line(std::vector<std::string>& lines, Builder& b) {
  const std::size_t at = b.pick(lines.size());
  switch (b.pick(4)) {
    case 0: {
      std::string& line = lines[at];  // never empty: it holds at least its '\n'
      const auto digit = line.find_first_of("0123456789");
      if (digit == std::string::npos) line.insert(line.size() - 1, "  # 1");
      else line[digit] = static_cast<char>('0' + (line[digit] - '0' + 1 + b.pick(8)) % 10);
      break;
    }
    case 1:
      lines.insert(lines.begin() + static_cast<std::ptrdiff_t>(at), "    # TODO: handle the empty case\n");
      break;
    case 2:
      lines.erase(lines.begin() + static_cast<std::ptrdiff_t>(at));
      break;
    default:
      break;
  }
}

// A shared file context with one small edit somewhere (a changed number, an
// inserted line, a deleted line) or none; the prompt ends at the cursor.
Scenario code(Builder& b, int requests) {
  Scenario s{"code", "2 source files; each request edits one line (number, insert, delete) or none", {}};
  struct File {
    const Document* doc;
    std::size_t first;
  };
  std::vector<File> files;
  std::vector<const Document*> used;
  for (int i = 0; i < 2; ++i) {
    const Document& d = b.document(false, 200, used);
    files.push_back({&d, b.pick(d.lines.size() / 4)});
  }
  for (int r = 0; r < requests; ++r) {
    const File& f = files[b.pick(files.size())];
    // Context lines (up to 85% of the budget), then the cursor line.
    std::size_t end = 0;
    b.lines(*f.doc, f.first, b.budget() * 85 / 100, &end);
    std::vector<std::string> ctx(f.doc->lines.begin() + static_cast<std::ptrdiff_t>(f.first),
                                 f.doc->lines.begin() + static_cast<std::ptrdiff_t>(end));
    if (ctx.size() < 2) throw std::invalid_argument("heldout: source file too short for the code scenario");
    edit_one_line(ctx, b);
    std::vector<int> prompt;
    for (const auto& line : ctx) append(prompt, b.encode(line));
    const int prefix = static_cast<int>(prompt.size());
    // The cursor: the next line's first half is typed, its rest and the
    // lines after are the continuation.
    std::vector<int> cursor = end < f.doc->lines.size() ? b.encode(f.doc->lines[end]) : std::vector<int>{};
    const std::size_t typed = cursor.size() / 2;
    append(prompt, std::vector<int>(cursor.begin(), cursor.begin() + static_cast<std::ptrdiff_t>(typed)));
    std::vector<int> cont(cursor.begin() + static_cast<std::ptrdiff_t>(typed), cursor.end());
    append(cont, b.text_after(*f.doc, end + 1, b.continuation()));
    cont.resize(std::min<std::size_t>(cont.size(), b.continuation()));
    if (cont.empty()) cont = b.question().second;
    s.requests.push_back(finish(std::move(prompt), prefix, std::move(cont), b.budget()));
  }
  return s;
}

// One shared document under a header whose name, number and date change:
// prefixes that differ in a few tokens, right at the start.
Scenario near_dup(Builder& b, int requests) {
  Scenario s{"near-dup", "2 shared documents under a header differing in a name, a number, a date", {}};
  static const char* kNames[] = {"Alice Martin", "Bob Chen", "Carla Diaz", "Dmitri Ivanov", "Emeka Obi",
                                 "Fatima Khan", "Goran Petrov", "Hana Sato"};
  std::vector<std::vector<int>> bodies;
  std::vector<const Document*> used;
  for (int i = 0; i < 2; ++i) {
    const Document& d = b.document(i == 0, 60, used);
    bodies.push_back(b.lines(d, 0, b.budget() * 80 / 100));
  }
  for (int r = 0; r < requests; ++r) {
    char header[160];
    std::snprintf(header, sizeof header, "# Review by %s, ticket #%d, filed 2024-%02d-%02d\n\n",
                  kNames[b.pick(8)], 1000 + static_cast<int>(b.pick(9000)), 1 + static_cast<int>(b.pick(12)),
                  1 + static_cast<int>(b.pick(28)));
    std::vector<int> prompt = b.encode(header);
    append(prompt, bodies[b.pick(bodies.size())]);
    s.requests.push_back(ask(b, std::move(prompt), "\n# Question: ", ""));
  }
  return s;
}

// The same retrieved passages behind a new question every time, always in a
// fresh order: exact prefix reuse keeps only the instruction line, while
// every passage is stored somewhere; only blending (moved chunks) reuses them.
Scenario rag_shuffled(Builder& b, int requests) {
  Scenario s{"rag-shuffled", "the same 4 retrieved passages in a new order behind every question", {}};
  const std::vector<std::vector<int>> passages = retrieved_passages(b, 4);
  std::vector<int> order = {0, 1, 2, 3};
  for (int r = 0; r < requests; ++r) {
    for (std::size_t i = order.size() - 1; i > 0; --i) std::swap(order[i], order[b.pick(i + 1)]);
    std::vector<int> prompt = b.encode("Answer the question using these passages.\n\n");
    for (int c : order) append(prompt, passages[c]);
    s.requests.push_back(ask(b, std::move(prompt), "Question: ", "Answer:"));
  }
  return s;
}

// A multi-turn chat resent with one earlier user turn edited (as a user
// rewords a question and regenerates), then a new question: exact prefix
// reuse stops at the edit, blending reuses the turns after it.
Scenario chat_edit(Builder& b, int requests) {
  Scenario s{"chat-edit", "2 multi-turn chats resent with an earlier user turn edited, then a new question", {}};
  struct Turn {
    std::string user;
    std::vector<int> answer;
  };
  std::vector<std::vector<Turn>> chats;
  std::vector<const Document*> used;
  const int answer_tokens = b.budget() / 7;
  for (int c = 0; c < 2; ++c) {
    std::vector<Turn> turns;
    const Document& d = b.document(true, 40, used);
    std::size_t line = 0;
    for (int t = 0; t < 4; ++t) turns.push_back({b.question_text().first, b.lines(d, line, answer_tokens, &line)});
    chats.push_back(std::move(turns));
  }
  for (int r = 0; r < requests; ++r) {
    std::vector<Turn> turns = chats[b.pick(chats.size())];
    std::string& edited = turns[b.pick(turns.size())].user;
    edited.insert(b.pick(edited.size()), "please ");
    std::vector<int> prompt = b.encode("System: You are a Python assistant.\n\n");
    for (const Turn& t : turns) {
      append(prompt, b.encode("User: " + t.user + "\nAssistant: "));
      append(prompt, t.answer);
      append(prompt, b.encode("\n\n"));
    }
    s.requests.push_back(ask(b, std::move(prompt), "User: ", "\nAssistant:"));
  }
  return s;
}

}  // namespace

std::vector<std::vector<int>> calibration_passages(std::string_view heldout, const llama::Tokenizer& tokenizer,
                                                   int context, std::uint64_t seed) {
  Builder b(heldout, tokenizer, context, seed * 131 + 7);
  std::vector<std::vector<int>> passages = {b.encode("Answer the question using these passages.\n\n")};
  for (auto& p : retrieved_passages(b, 4)) passages.push_back(std::move(p));
  return passages;
}

const std::vector<std::string>& scenario_names() {
  static const std::vector<std::string> names = {"chatbot", "rag", "code", "near-dup", "rag-shuffled", "chat-edit"};
  return names;
}

Scenario make_scenario(std::string_view name, std::string_view heldout, const llama::Tokenizer& tokenizer, int context,
                       int requests, std::uint64_t seed) {
  if (context < 64) throw std::invalid_argument("context: need at least 64 tokens");
  if (requests < 1) throw std::invalid_argument("requests: must be positive");
  // Each scenario draws from its own stream: adding one does not move another.
  std::uint64_t stream = seed;
  for (char c : name) stream = stream * 131 + static_cast<unsigned char>(c);
  Builder b(heldout, tokenizer, context, stream);
  if (name == "chatbot") return chatbot(b, requests);
  if (name == "rag") return rag(b, requests);
  if (name == "code") return code(b, requests);
  if (name == "near-dup") return near_dup(b, requests);
  if (name == "rag-shuffled") return rag_shuffled(b, requests);
  if (name == "chat-edit") return chat_edit(b, requests);
  throw std::invalid_argument("scenario: unknown '" + std::string(name) +
                              "' (chatbot, rag, code, near-dup, rag-shuffled, chat-edit)");
}

}  // namespace attention_echo::bench
