// A small fp32 inference engine for Llama-architecture decoders (RMSNorm,
// interleaved-pair RoPE, GQA, SwiGLU) whose attention runs one of three ways:
// exact attention, from a stored prompt prefix's K/V (what vLLM and SGLang
// do), or AttentionEchoCache in every layer. Which one a prompt takes is the
// serving module's choice (attention_echo/serving.hpp).
//
// Loads llama2.c checkpoints (legacy v0 .bin) and GGUF v2/v3 files (llama
// architecture; float and quantized tensors, dequantized at load). Bad files
// throw std::runtime_error naming the file and what is wrong; bad arguments
// throw std::invalid_argument naming the argument.
#pragma once

#include <cstdint>
#include <memory>
#include <mutex>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "attention_echo/cache.hpp"
#include "attention_echo/thread_pool.hpp"

namespace attention_echo::llama {

struct ModelConfig {
  int dim = 0;         // embedding width
  int hidden_dim = 0;  // SwiGLU width
  int n_layers = 0;
  int n_heads = 0;
  int n_kv_heads = 0;
  int vocab_size = 0;
  int seq_len = 0;     // trained context length
  float rope_theta = 10000.0f;
  float norm_eps = 1e-5f;

  int head_dim() const { return dim / n_heads; }
  int kv_dim() const { return n_kv_heads * head_dim(); }
  // Throws std::runtime_error if the numbers cannot describe a model.
  void validate() const;
};

// Weights as the checkpoint stores them: row-major [out, in] matrices, Q/K
// rows laid out for RoPE on adjacent pairs (llama2.c and GGUF "norm" RoPE).
struct Weights {
  ModelConfig config;
  std::vector<float> token_embedding;  // [vocab, dim]
  struct Layer {
    std::vector<float> attn_norm;  // [dim]
    std::vector<float> wq;         // [dim, dim]
    std::vector<float> wk;         // [kv_dim, dim]
    std::vector<float> wv;         // [kv_dim, dim]
    std::vector<float> wo;         // [dim, dim]
    std::vector<float> ffn_norm;   // [dim]
    std::vector<float> w_gate;     // [hidden, dim]  (llama2.c w1)
    std::vector<float> w_down;     // [dim, hidden]  (llama2.c w2)
    std::vector<float> w_up;       // [hidden, dim]  (llama2.c w3)
  };
  std::vector<Layer> layers;
  std::vector<float> final_norm;  // [dim]
  std::vector<float> classifier;  // [vocab, dim]; empty: tied to token_embedding
  // [head_dim / 2] divisors of RoPE's frequencies (GGUF rope_freqs.weight,
  // how llama.cpp stores Llama 3.1's long-context scaling); empty: plain RoPE.
  std::vector<float> rope_freq_factors;
  // The tokenizer a GGUF file carries (tokenizer.ggml.*). `model` is its
  // kind; the rest is read for the two Tokenizer implements: "llama"
  // (SentencePiece BPE: pieces with U+2581 read as a space, and scores) and
  // "gpt2" (byte-level BPE: pieces in GPT-2's byte alphabet as stored,
  // merges, the pre-tokenizer's name). Control and unknown tokens are
  // empty pieces, which no text encodes to. Empty for llama2.c
  // checkpoints, whose tokenizer.bin is a file of its own.
  struct Vocabulary {
    std::string model;
    std::vector<std::string> pieces;
    std::vector<float> scores;
    std::vector<std::string> merges;  // "gpt2": "left right", highest priority first
    std::string pre;                  // "gpt2": tokenizer.ggml.pre
    int bos = 1, eos = 2;             // -1: none
    bool add_bos = true;              // tokenizer.ggml.add_bos_token
  };
  Vocabulary vocabulary;
};

Weights load_llama2c(const std::string& path);
Weights load_gguf(const std::string& path);
// Picks the format from the file's first bytes.
Weights load_weights(const std::string& path);

// llama2.c tokenizer.bin: sentencepiece-style BPE that merges the adjacent
// pair with the highest vocabulary score until none is left, bytes that no
// piece covers fall back to <0xXX> tokens. A GGUF file's vocabulary is
// either that ("llama") or GPT-2-style byte-level BPE ("gpt2",
// engine/byte_level_bpe.hpp).
class Tokenizer {
 public:
  static constexpr int kBos = 1;  // SentencePiece's ids, llama2.c's
  static constexpr int kEos = 2;

  Tokenizer(const std::string& path, int vocab_size);
  // From a GGUF file's vocabulary (Weights::vocabulary); throws
  // std::invalid_argument naming what is wrong: a "llama" one needs at
  // least 3 pieces with a score each and BOS / EOS at kBos / kEos; a
  // "gpt2" one a token for every byte, BOS / EOS inside the vocabulary or
  // none, and a pre-tokenizer it implements; other kinds are refused.
  explicit Tokenizer(const Weights::Vocabulary& vocabulary);
  ~Tokenizer();
  Tokenizer(Tokenizer&&) noexcept;
  Tokenizer& operator=(Tokenizer&&) noexcept;

  struct EncodeOptions {
    bool bos = true;  // where the vocabulary has one
    bool eos = false;
    bool dummy_prefix = true;  // llama2.c prepends " " to non-empty text (SentencePiece only)
  };
  std::vector<int> encode(std::string_view text, const EncodeOptions& options) const;
  // The text as the model reads a prompt: BOS where the vocabulary adds one
  // (always for llama2.c's), and llama2.c's dummy prefix only where the
  // vocabulary has merged pieces (sentencepiece-trained): a pure byte
  // vocabulary was trained on raw bytes, without one.
  std::vector<int> encode(std::string_view text) const;
  int bos() const;  // -1: none
  int eos() const;
  // Text of `token` following `previous` (the leading space after BOS is dropped).
  std::string decode(int previous, int token) const;
  int vocab_size() const;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

// The tokenizer of the model read from model_path: tokenizer_path (a
// llama2.c tokenizer.bin) when not empty, else the vocabulary its GGUF file
// carries, else tokenizer.bin beside it. Throws std::invalid_argument
// naming a vocabulary kind that is not implemented, std::runtime_error
// when a tokenizer.bin is missing or broken.
Tokenizer model_tokenizer(const Weights& weights, const std::string& model_path,
                          const std::string& tokenizer_path = {});

// Weights repacked for the engine's GEMM.
class Model {
 public:
  explicit Model(const Weights& weights);
  ~Model();
  Model(Model&&) noexcept;
  const ModelConfig& config() const;
  // A hash of the config and every weight: what names the model's K/V in a
  // shared store (PlannerConfig::model_fingerprint).
  std::uint64_t fingerprint() const;

  // The repacked weights an Engine runs on; opaque outside the engine.
  struct Packed;
  const Packed& packed() const { return *packed_; }

 private:
  std::unique_ptr<Packed> packed_;
};

// One page of a sequence's K/V: the K and V rows of every layer for
// page_tokens consecutive positions, layer l's K at
// data[2l * page_tokens * kv_dim] and its V at data[(2l + 1) * page_tokens *
// kv_dim], row t of a plane t * kv_dim after its start. The serving store
// keeps these same objects as its blocks (serving/kv_block_store.hpp).
struct KVPage {
  std::vector<float> data;  // [2 * layers][page_tokens][kv_dim]
};

// Where K/V pages of one size come from: a free list that pages return to
// when their last holder drops them (the store evicting, a request's state
// going away), and reserve(), which writes pages in ahead of use, so that a
// server takes its K/V memory at startup (as vLLM and llama.cpp allocate
// their K/V cache) rather than inside the requests that first grow into it.
// That growth is not free: on this project's VMs, whose host backs guest
// memory lazily, a 4 KiB page the process had not touched cost 12-54 us to
// write the first time, which added ~300 ms to each near-dup request while
// the stores grew (README, "Things worth knowing"). Thread-safe. Create it
// with std::make_shared: pages find their way back through a weak pointer,
// and a page that outlives its pool is simply freed.
class KVPagePool : public std::enable_shared_from_this<KVPagePool> {
 public:
  // Throws std::invalid_argument unless page_floats > 0.
  explicit KVPagePool(std::size_t page_floats);
  std::size_t page_floats() const { return page_floats_; }
  // A zeroed page, or a copy of `page` (of this pool's size), reusing a
  // free one when there is one.
  std::shared_ptr<KVPage> zeroed();
  std::shared_ptr<KVPage> copy(const KVPage& page);
  // Grows the free list to at least `pages` pages, each written once.
  void reserve(std::size_t pages);
  std::size_t free_pages() const;

 private:
  std::shared_ptr<KVPage> wrap(std::vector<float> data);
  std::vector<float> take();

  const std::size_t page_floats_;
  mutable std::mutex mutex_;
  std::vector<std::vector<float>> free_;
};

// Per-layer K and V (K already rotated) of a sequence's first `length`
// tokens, in pages of page_tokens positions that are shared, never copied:
// a copy of the state, prefix(), and the serving store (which keeps the
// pages a forward wrote and hands stored ones to the next prompt) hold the
// same page objects. A page anyone else also holds is frozen: the engine
// copies it before writing into it (copy-on-write), which happens to at
// most the one page where a shared prefix ends inside a page.
//
// page_tokens is a positive multiple of kKeyChunk (64, tensor.hpp): the
// attention kernel then reads the pages in place, one page per step of
// keys. It can be changed only while the state has no pages.
struct KVState {
  static constexpr int kDefaultPageTokens = 64;

  int length = 0;
  int page_tokens = kDefaultPageTokens;
  int layers = 0;  // the pages' shape, set with the first page
  int kv_dim = 0;
  std::vector<std::shared_ptr<const KVPage>> pages;
  // Where new pages come from (and copies of shared ones); null: the heap.
  std::shared_ptr<KVPagePool> pool;

  // Row t of layer l's K or V, for t below pages.size() * page_tokens.
  const float* k(int layer, int t) const { return row(2 * layer, t); }
  const float* v(int layer, int t) const { return row(2 * layer + 1, t); }
  // Readies rows [t0, t1) for writing: pages up to row t1 are added (zeroed)
  // and each page the rows fall in that is shared is replaced by a copy of
  // its own. Sets layers and kv_dim with the first page. Throws
  // std::invalid_argument("kv: ...") when the state's shape, page_tokens or
  // pool's page size does not fit, or rows before t0 are missing; nothing
  // changes then.
  void make_writable(int t0, int t1, int model_layers, int model_kv_dim);
  // Row t of layer l's K or V to write into: only rows the last
  // make_writable covered, before the state is copied or shared again.
  float* writable_k(int layer, int t) { return const_cast<float*>(k(layer, t)); }
  float* writable_v(int layer, int t) { return const_cast<float*>(v(layer, t)); }
  // The first `tokens` rows of this state, sharing its pages.
  KVState prefix(int tokens) const;
  // Bytes of the pages the state holds (shared ones counted in full).
  std::size_t bytes() const;

 private:
  const float* row(int plane, int t) const {
    return pages[t / page_tokens]->data.data() +
           (static_cast<std::size_t>(plane) * page_tokens + t % page_tokens) * kv_dim;
  }
};

// How a forward call computes attention for its rows.
struct AttentionRoute {
  // Non-null: every layer goes through cache->attention_with_echo with
  // layer_id = layer index and prefix_embeddings = that layer's input after
  // its attention RMSNorm (what Q/K/V are projected from) over the prefix
  // rows. Requires the call to start at row 0. Null: exact attention.
  AttentionEchoCache* cache = nullptr;
  int prefix_length = 0;                  // rows the cache may echo
  std::span<const std::int32_t> prefix_tokens;  // enables the exact tier
  std::string_view name_space;
};

// Time split two ways, as the benchmark reports it: wall clock (what a
// user waits) and this process's CPU time (what the work costs; unlike wall
// time it does not grow when other processes share the cores).
struct Timers {
  double attention_s = 0.0;  // attention kernels and cache calls
  double total_s = 0.0;      // whole forward calls
  double attention_cpu_s = 0.0;
  double total_cpu_s = 0.0;
};

// What a forward call over rows [t0, t1) returns.
struct ForwardResult {
  std::vector<float> hidden;   // final-normed hidden states of the rows kept, [rows, dim]
  std::vector<float> logits;   // [rows, vocab] of the rows kept
  std::vector<EchoResult> echo;      // one per layer when the route used a cache
  std::vector<double> attention_cpu_s;  // per layer, CPU seconds
};

// Not thread-safe: one Engine per thread (they may share a Model and a pool).
class Engine {
 public:
  Engine(const Model& model, ThreadPool& pool);

  const ModelConfig& config() const;

  // The primitive everything else is made of: hidden rows x [t1 - t0, dim]
  // of positions [t0, t1) through layer `layer` (x is updated in place),
  // attending to the layer's K/V of positions [0, t1); kv's layer gains the
  // K/V of rows [t0, t1) (its rows [0, t0) may come from any source: a
  // stored prefix, another request). kv.length is the caller's to advance.
  // Returns the echo metadata when the route uses a cache.
  EchoResult layer_forward(int layer, float* x, int t0, int t1, KVState& kv,
                           const AttentionRoute& route);
  // The KV-blend tier's primitives. K and V of positions [t0, t1) of layer
  // `layer` from their hidden rows x [t1 - t0, dim] into kv, without the
  // attention and MLP that would follow. Returns the last row's query
  // [dim] (RoPE'd): what that row attends with.
  std::vector<float> project_kv(int layer, const float* x, int t0, int t1, KVState& kv);
  // layer_forward for the rows at `positions` (ascending) only: x holds
  // their hidden rows [positions.size(), dim]; kv's layer must hold the K/V
  // of every other position below positions.back() (from any source) and
  // gains those of `positions`.
  void layer_forward_rows(int layer, float* x, std::span<const int> positions, KVState& kv);
  // A K row (every kv head) RoPE'd for position `from`, rotated in place to
  // what it would be at position `to`: reused K of tokens that moved.
  void rerotate_k(float* k_row, int from, int to) const;
  // Token embeddings [tokens, dim]: the input of layer 0.
  std::vector<float> embed(std::span<const int> tokens) const;
  // Final RMSNorm and classifier of `rows` hidden rows into result.hidden/logits.
  void head(const float* x, int rows, ForwardResult& result);

  // Appends tokens to the sequence whose K/V is in kv (kv.length tokens so
  // far) and returns the final hidden state and logits of the last
  // `keep_rows` new rows (all of them when keep_rows < 0).
  ForwardResult forward(std::span<const int> tokens, KVState& kv, const AttentionRoute& route,
                        int keep_rows = 1);

  Timers& timers();

  ~Engine();
  Engine(Engine&&) noexcept;

 private:
  struct Impl;  // the model, the pool, timers and scratch buffers
  std::unique_ptr<Impl> impl_;
};

}  // namespace attention_echo::llama
