#include "engine/ggml_quants.hpp"

#include <array>
#include <cmath>
#include <cstring>
#include <limits>
#include <stdexcept>
#include <string>

namespace attention_echo::llama {
namespace {

constexpr std::uint32_t kF32 = 0, kF16 = 1, kQ4_0 = 2, kQ4_1 = 3, kQ5_0 = 6, kQ5_1 = 7, kQ8_0 = 8, kQ2_K = 10,
                        kQ3_K = 11, kQ4_K = 12, kQ5_K = 13, kQ6_K = 14, kBF16 = 30;
constexpr int kQK = 32;    // values in a legacy block
constexpr int kQKK = 256;  // values in a k-quant super-block

float half_to_float(std::uint16_t h) {
  const std::uint32_t sign = (h & 0x8000u) << 16, exp = (h >> 10) & 0x1f, mant = h & 0x3ff;
  float value;
  if (exp == 0) {
    value = std::ldexp(static_cast<float>(mant), -24);  // zero or subnormal
  } else if (exp == 31) {
    value = mant ? std::numeric_limits<float>::quiet_NaN() : std::numeric_limits<float>::infinity();
  } else {
    const std::uint32_t bits = ((exp + 112) << 23) | (mant << 13);
    std::memcpy(&value, &bits, 4);
  }
  std::uint32_t bits;
  std::memcpy(&bits, &value, 4);
  bits |= sign;
  std::memcpy(&value, &bits, 4);
  return value;
}

float f16_at(const unsigned char* p) {
  std::uint16_t h;
  std::memcpy(&h, p, 2);
  return half_to_float(h);
}

// Legacy blocks: 32 values, one scale d (and an offset m for the _1 types);
// value j's 4 low bits are nibble j % 16 of qs (low nibbles first), its
// fifth bit (Q5) bit j of the 32-bit qh.
template <int kBits, bool kOffset>
void legacy_block(const unsigned char* b, float* y) {
  const float d = f16_at(b);
  const float m = kOffset ? f16_at(b + 2) : 0.0f;
  const unsigned char* p = b + (kOffset ? 4 : 2);
  std::uint32_t qh = 0;
  if constexpr (kBits == 5) {
    std::memcpy(&qh, p, 4);
    p += 4;
  }
  // Without an offset the codes are centred: 4 bits around 8, 5 around 16.
  const int centre = kOffset ? 0 : 1 << (kBits - 1);
  for (int j = 0; j < kQK / 2; ++j) {
    int lo = p[j] & 0x0F, hi = p[j] >> 4;
    if constexpr (kBits == 5) {
      lo |= static_cast<int>((qh >> j) & 1u) << 4;
      hi |= static_cast<int>((qh >> (j + 16)) & 1u) << 4;
    }
    y[j] = d * static_cast<float>(lo - centre) + m;
    y[j + kQK / 2] = d * static_cast<float>(hi - centre) + m;
  }
}

void q8_0_block(const unsigned char* b, float* y) {
  const float d = f16_at(b);
  for (int j = 0; j < kQK; ++j) y[j] = d * static_cast<float>(static_cast<std::int8_t>(b[2 + j]));
}

// Q2_K: scales[16] (4-bit scale, 4-bit min per 16 values), qs[64] (2-bit
// codes), d, dmin. Each half of 128 values takes 32 bytes of qs, four
// 2-bit planes of them, 16 values per scale.
void q2_k_block(const unsigned char* b, float* y) {
  const unsigned char* scales = b;
  const unsigned char* q = b + 16;
  const float d = f16_at(b + 80), dmin = f16_at(b + 82);
  int is = 0;
  for (int half = 0; half < 2; ++half, q += 32)
    for (int shift = 0; shift < 8; shift += 2)
      for (int part = 0; part < 2; ++part, ++is) {
        const float dl = d * static_cast<float>(scales[is] & 0x0F), ml = dmin * static_cast<float>(scales[is] >> 4);
        for (int l = 0; l < 16; ++l) *y++ = dl * static_cast<float>((q[16 * part + l] >> shift) & 3) - ml;
      }
}

// Q3_K: hmask[32] (each code's third bit, cleared meaning -4), qs[64]
// (2-bit planes as in Q2_K), scales[12] (16 signed 6-bit scales: low
// nibbles in bytes 0-7, high 2-bit pairs in bytes 8-11), d.
void q3_k_block(const unsigned char* b, float* y) {
  const unsigned char* hmask = b;
  const unsigned char* q = b + 32;
  const unsigned char* packed = b + 96;
  const float d = f16_at(b + 108);
  std::array<int, 16> scale;
  for (int i = 0; i < 16; ++i) {
    const int low = (packed[i % 8] >> (4 * (i / 8))) & 0x0F;
    const int high = (packed[8 + i % 4] >> (2 * (i / 4))) & 0x03;
    scale[i] = (low | (high << 4)) - 32;
  }
  int is = 0;
  unsigned mask = 1;
  for (int half = 0; half < 2; ++half, q += 32)
    for (int shift = 0; shift < 8; shift += 2, mask <<= 1)
      for (int part = 0; part < 2; ++part, ++is) {
        const float dl = d * static_cast<float>(scale[is]);
        for (int l = 16 * part; l < 16 * part + 16; ++l) {
          const int code = ((q[l] >> shift) & 3) - ((hmask[l] & mask) ? 0 : 4);
          *y++ = dl * static_cast<float>(code);
        }
      }
}

// Q4_K/Q5_K's 12 packed bytes: eight 6-bit scales and eight 6-bit mins,
// the first four of each whole in bytes 0-3 / 4-7, the last four split
// between bytes 8-11's nibbles and the top two bits of bytes 0-7.
void scale_min_k4(int j, const unsigned char* q, int& scale, int& min) {
  if (j < 4) {
    scale = q[j] & 63;
    min = q[j + 4] & 63;
  } else {
    scale = (q[j + 4] & 0x0F) | ((q[j - 4] >> 6) << 4);
    min = (q[j + 4] >> 4) | ((q[j] >> 6) << 4);
  }
}

// Q4_K: d, dmin, scales[12], qs[128]; 64 values per 32 bytes of qs, the
// low nibbles the first 32 (sub-block 2i), the high the next (2i + 1).
// Q5_K adds qh[32] before qs: bit 2i of qh[l] is value l's fifth bit in
// sub-block 2i, bit 2i + 1 in sub-block 2i + 1.
template <bool kFifthBit>
void q45_k_block(const unsigned char* b, float* y) {
  const float d = f16_at(b), dmin = f16_at(b + 2);
  const unsigned char* packed = b + 4;
  const unsigned char* qh = b + 16;
  const unsigned char* q = b + (kFifthBit ? 48 : 16);
  for (int pair = 0; pair < 4; ++pair, q += 32)
    for (int nibble = 0; nibble < 2; ++nibble) {
      const int sub = 2 * pair + nibble;
      int scale, min;
      scale_min_k4(sub, packed, scale, min);
      const float dl = d * static_cast<float>(scale), ml = dmin * static_cast<float>(min);
      for (int l = 0; l < 32; ++l) {
        int code = (q[l] >> (4 * nibble)) & 0x0F;
        if constexpr (kFifthBit) code |= ((qh[l] >> sub) & 1) << 4;
        *y++ = dl * static_cast<float>(code) - ml;
      }
    }
}

// Q6_K: ql[128] (low 4 bits), qh[64] (high 2 bits), scales[16] (signed,
// one per 16 values), d. Per half of 128 values: value l + 32 k takes
// nibble k / 2 of ql[l + 32 (k % 2)] and bits 2k..2k+1 of qh[l].
void q6_k_block(const unsigned char* b, float* y) {
  const unsigned char* ql = b;
  const unsigned char* qh = b + 128;
  const auto* scales = reinterpret_cast<const std::int8_t*>(b + 192);
  const float d = f16_at(b + 208);
  for (int half = 0; half < 2; ++half, ql += 64, qh += 32, scales += 8, y += 128)
    for (int k = 0; k < 4; ++k)
      for (int l = 0; l < 32; ++l) {
        const int low = (ql[l + 32 * (k % 2)] >> (4 * (k / 2))) & 0x0F;
        const int code = (low | (((qh[l] >> (2 * k)) & 3) << 4)) - 32;
        y[32 * k + l] = d * static_cast<float>(scales[l / 16 + 2 * k]) * static_cast<float>(code);
      }
}

using BlockDecoder = void (*)(const unsigned char*, float*);

struct Decoder {
  GgmlType type;
  BlockDecoder block;
};

std::optional<Decoder> decoder(std::uint32_t id) {
  switch (id) {
    case kF32: return Decoder{{"F32", 1, 4}, nullptr};
    case kF16: return Decoder{{"F16", 1, 2}, nullptr};
    case kBF16: return Decoder{{"BF16", 1, 2}, nullptr};
    case kQ4_0: return Decoder{{"Q4_0", kQK, 18}, legacy_block<4, false>};
    case kQ4_1: return Decoder{{"Q4_1", kQK, 20}, legacy_block<4, true>};
    case kQ5_0: return Decoder{{"Q5_0", kQK, 22}, legacy_block<5, false>};
    case kQ5_1: return Decoder{{"Q5_1", kQK, 24}, legacy_block<5, true>};
    case kQ8_0: return Decoder{{"Q8_0", kQK, 34}, q8_0_block};
    case kQ2_K: return Decoder{{"Q2_K", kQKK, 84}, q2_k_block};
    case kQ3_K: return Decoder{{"Q3_K", kQKK, 110}, q3_k_block};
    case kQ4_K: return Decoder{{"Q4_K", kQKK, 144}, q45_k_block<false>};
    case kQ5_K: return Decoder{{"Q5_K", kQKK, 176}, q45_k_block<true>};
    case kQ6_K: return Decoder{{"Q6_K", kQKK, 210}, q6_k_block};
    default: return std::nullopt;
  }
}

}  // namespace

std::optional<GgmlType> ggml_type(std::uint32_t id) {
  if (auto d = decoder(id)) return d->type;
  return std::nullopt;
}

const char* ggml_type_name(std::uint32_t id) {
  if (auto d = decoder(id)) return d->type.name;
  // The types llama.cpp writes that this loader does not decode.
  switch (id) {
    case 9: return "Q8_1";
    case 15: return "Q8_K";
    case 16: return "IQ2_XXS";
    case 17: return "IQ2_XS";
    case 18: return "IQ3_XXS";
    case 19: return "IQ1_S";
    case 20: return "IQ4_NL";
    case 21: return "IQ3_S";
    case 22: return "IQ2_S";
    case 23: return "IQ4_XS";
    case 29: return "IQ1_M";
    case 34: return "TQ1_0";
    case 35: return "TQ2_0";
    case 39: return "MXFP4";
    default: return "unknown";
  }
}

void dequantize(std::uint32_t id, const unsigned char* src, float* dst, std::size_t values) {
  const auto d = decoder(id);
  if (!d) throw std::invalid_argument("id: ggml type " + std::to_string(id) + " is not decodable");
  if (values % d->type.block_values != 0)
    throw std::invalid_argument("values: must be a multiple of " + std::string(d->type.name) + "'s block of " +
                                std::to_string(d->type.block_values));
  switch (id) {
    case kF32: std::memcpy(dst, src, values * 4); return;
    case kF16:
      for (std::size_t i = 0; i < values; ++i) dst[i] = f16_at(src + 2 * i);
      return;
    case kBF16:
      for (std::size_t i = 0; i < values; ++i) {
        std::uint16_t h;
        std::memcpy(&h, src + 2 * i, 2);
        const std::uint32_t bits = static_cast<std::uint32_t>(h) << 16;
        std::memcpy(dst + i, &bits, 4);
      }
      return;
    default:
      for (std::size_t b = 0; b < values / d->type.block_values; ++b)
        d->block(src + b * d->type.block_bytes, dst + b * d->type.block_values);
  }
}

}  // namespace attention_echo::llama
