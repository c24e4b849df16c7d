// ggml's tensor types as GGUF files store them: float, bfloat16 and the
// block-quantized formats llama.cpp's quantizer writes (the legacy 32-value
// blocks and the 256-value k-quants). The engine computes in fp32, so a
// quantized model is dequantized once, at load: its numbers are those of the
// quantized weights, its memory and speed those of an fp32 model.
//
// Layouts follow ggml-common.h's block structs (little-endian, packed); each
// decoder here is written from that layout and checked against gguf-py's
// numpy dequantizer (tests/engine/test_gguf_quantized.py).
#pragma once

#include <cstddef>
#include <cstdint>
#include <optional>

namespace attention_echo::llama {

// A ggml type's storage: `block_values` values take `block_bytes` bytes, and
// a row's length must be a multiple of block_values.
struct GgmlType {
  const char* name;
  std::uint32_t block_values;
  std::uint32_t block_bytes;
};

// The type with ggml id `id` if the loader can decode it (F32, F16, BF16,
// Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K).
std::optional<GgmlType> ggml_type(std::uint32_t id);

// ggml's name for type `id` ("IQ2_XXS"), or its number when unknown.
const char* ggml_type_name(std::uint32_t id);

// Decodes `values` values of ggml type `id` (values a multiple of its
// block_values; src holds values / block_values blocks) into dst.
void dequantize(std::uint32_t id, const unsigned char* src, float* dst, std::size_t values);

}  // namespace attention_echo::llama
