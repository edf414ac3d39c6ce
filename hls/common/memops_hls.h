// Types and helpers shared by the memops HLS kernels.
//
// The kernels move data in 512-bit HBM words (`word_t`) and compute in float32, like the CPU
// backend: lanes are converted with exact widening (fp16/bf16 -> float) and round-to-nearest-even
// narrowing that matches c10::Half / c10::BFloat16, so that C-simulation and the extension's
// emulation give the CPU backend's bits.
//
// Vitis HLS (__SYNTHESIS__) and the csim build (MEMOPS_HLS_VENDOR_HEADERS) use the vendor
// ap_int.h / hls_stream.h. A host build without them (the extension on a machine without the
// hls4ml headers) uses the small stand-ins of host_types.h, which implement only what the kernels
// below use.
#pragma once

#include <cstdint>

#if defined(__SYNTHESIS__) || defined(MEMOPS_HLS_VENDOR_HEADERS)
#include <ap_int.h>
#include <hls_stream.h>
#define MEMOPS_HLS_VENDOR_TYPES 1
#else
#include "host_types.h"
#endif

namespace memops_hls {

#if defined(MEMOPS_HLS_VENDOR_TYPES)
using word_t = ap_uint<512>;
#else
using word_t = host_word512;
#endif

constexpr int kWordBytes = 64;
static_assert(sizeof(word_t) == kWordBytes, "a 512-bit word must occupy 64 bytes in memory");

// Element types, as the `dtype` scalar argument of every kernel. kInt8: the codes of an int8
// summary (csrc/include/memops/quantize.h), 64 a word.
enum DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2, kInt8 = 3 };

// Design limits of the kernels' on-chip buffers (checked by the host before a launch).
constexpr int kMaxHeadDim = 256;          // D
constexpr int kMaxLanes = 32;             // 16-bit lanes per word
constexpr int kMaxRowWords = kMaxHeadDim * 4 / kWordBytes;  // 16 words = D 256 in float32
constexpr int kMaxQueryHeads = 64;        // G (GQA group, or indexer heads)
constexpr int kMaxReps = 4;               // R
constexpr int kMaxTopK = 2048;            // k
constexpr int kMaxPages = 16384;          // N
constexpr int kStreamDepth = 64;

inline int lanes_per_word(int dtype) { return dtype == kFloat32 ? 16 : 32; }

inline uint32_t get_bits32(const word_t& w, int lane) {
#if defined(MEMOPS_HLS_VENDOR_TYPES)
  return static_cast<uint32_t>(w.range(32 * lane + 31, 32 * lane));
#else
  return w.get32(lane);
#endif
}

inline uint16_t get_bits16(const word_t& w, int lane) {
#if defined(MEMOPS_HLS_VENDOR_TYPES)
  return static_cast<uint16_t>(w.range(16 * lane + 15, 16 * lane));
#else
  return w.get16(lane);
#endif
}

inline void set_bits32(word_t& w, int lane, uint32_t v) {
#if defined(MEMOPS_HLS_VENDOR_TYPES)
  w.range(32 * lane + 31, 32 * lane) = v;
#else
  w.set32(lane, v);
#endif
}

inline void set_bits16(word_t& w, int lane, uint16_t v) {
#if defined(MEMOPS_HLS_VENDOR_TYPES)
  w.range(16 * lane + 15, 16 * lane) = v;
#else
  w.set16(lane, v);
#endif
}

inline word_t zero_word() {
  word_t w;
#if defined(MEMOPS_HLS_VENDOR_TYPES)
  w = 0;
#else
  w.clear();
#endif
  return w;
}

union FloatBits {
  float f;
  uint32_t u;
};

inline float float_from_bits(uint32_t u) {
  FloatBits b;
  b.u = u;
  return b.f;
}

inline uint32_t bits_from_float(float f) {
  FloatBits b;
  b.f = f;
  return b.u;
}

// IEEE half -> float, exact (normals, subnormals, inf, NaN with its payload).
inline float half_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t exp = (h >> 10) & 0x1Fu;
  uint32_t mant = h & 0x3FFu;
  if (exp == 0x1Fu) return float_from_bits(sign | 0x7F800000u | (mant << 13));
  if (exp != 0) return float_from_bits(sign | ((exp + 112u) << 23) | (mant << 13));
  if (mant == 0) return float_from_bits(sign);
  // Subnormal: normalise the mantissa (at most 10 shifts).
  uint32_t e = 113;
normalise:
  for (int i = 0; i < 10; ++i) {
#pragma HLS PIPELINE II = 1
    if (mant & 0x400u) break;
    mant <<= 1;
    --e;
  }
  return float_from_bits(sign | (e << 23) | ((mant & 0x3FFu) << 13));
}

// float -> IEEE half, round to nearest even; NaN becomes the quiet NaN 0x7E00 with the sign
// (as c10::Half does).
inline uint16_t float_to_half(float f) {
  const uint32_t u = bits_from_float(f);
  const uint16_t sign = static_cast<uint16_t>((u >> 16) & 0x8000u);
  const uint32_t abs = u & 0x7FFFFFFFu;
  if (abs > 0x7F800000u) return sign | 0x7E00u;
  if (abs >= 0x477FF000u) return sign | 0x7C00u;  // rounds to or beyond 65520: inf
  if (abs < 0x38800000u) {                          // below the smallest normal half
    if (abs < 0x33000000u) return sign;             // below half the smallest subnormal: 0
    const uint32_t exp = abs >> 23;
    const uint32_t mant = (abs & 0x7FFFFFu) | 0x800000u;
    const uint32_t shift = 126u - exp;  // 14 .. 24
    const uint32_t kept = mant >> shift;
    const uint32_t rest = mant & ((1u << shift) - 1u);
    const uint32_t halfway = 1u << (shift - 1u);
    const uint32_t round_up = rest > halfway || (rest == halfway && (kept & 1u));
    return sign | static_cast<uint16_t>(kept + round_up);
  }
  const uint32_t rounded = abs + 0xFFFu + ((abs >> 13) & 1u);
  return sign | static_cast<uint16_t>((rounded - 0x38000000u) >> 13);
}

inline float bf16_to_float(uint16_t h) { return float_from_bits(static_cast<uint32_t>(h) << 16); }

// float -> bfloat16, round to nearest even; NaN becomes 0x7FC0 (as c10::BFloat16 does).
inline uint16_t float_to_bf16(float f) {
  const uint32_t u = bits_from_float(f);
  if ((u & 0x7FFFFFFFu) > 0x7F800000u) return 0x7FC0u;
  return static_cast<uint16_t>((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}

// Element `lane` of a word as float32.
inline float lane_to_float(const word_t& w, int lane, int dtype) {
  if (dtype == kFloat32) return float_from_bits(get_bits32(w, lane));
  const uint16_t h = get_bits16(w, lane);
  return dtype == kFloat16 ? half_to_float(h) : bf16_to_float(h);
}

inline void float_to_lane(word_t& w, int lane, int dtype, float v) {
  if (dtype == kFloat32)
    set_bits32(w, lane, bits_from_float(v));
  else
    set_bits16(w, lane, dtype == kFloat16 ? float_to_half(v) : float_to_bf16(v));
}

// One row of `row_words` words -> `row_words * lanes` floats.
inline void unpack_row(const word_t* words, int row_words, int dtype, float* out) {
  const int lanes = lanes_per_word(dtype);
unpack_words:
  for (int w = 0; w < row_words; ++w) {
  unpack_lanes:
    for (int l = 0; l < kMaxLanes; ++l) {
#pragma HLS UNROLL
      if (l < lanes) out[w * lanes + l] = lane_to_float(words[w], l, dtype);
    }
  }
}

constexpr int kInt8Lanes = 64;

inline int8_t get_int8(const word_t& w, int lane) {
#if defined(MEMOPS_HLS_VENDOR_TYPES)
  return static_cast<int8_t>(static_cast<uint8_t>(w.range(8 * lane + 7, 8 * lane)));
#else
  return static_cast<int8_t>(w.get8(lane));
#endif
}

inline void set_int8(word_t& w, int lane, int8_t v) {
#if defined(MEMOPS_HLS_VENDOR_TYPES)
  w.range(8 * lane + 7, 8 * lane) = static_cast<uint8_t>(v);
#else
  w.set8(lane, static_cast<uint8_t>(v));
#endif
}

// One row of `row_words` words of int8 codes -> `row_words * 64` floats (exact).
inline void unpack_codes(const word_t* words, int row_words, float* out) {
unpack_code_words:
  for (int w = 0; w < row_words; ++w) {
  unpack_code_lanes:
    for (int l = 0; l < kInt8Lanes; ++l) {
#pragma HLS UNROLL
      out[w * kInt8Lanes + l] = static_cast<float>(get_int8(words[w], l));
    }
  }
}

inline word_t pack_word(const float* in, int dtype) {
  const int lanes = lanes_per_word(dtype);
  word_t w = zero_word();
pack_lanes:
  for (int l = 0; l < kMaxLanes; ++l) {
#pragma HLS UNROLL
    if (l < lanes) float_to_lane(w, l, dtype, in[l]);
  }
  return w;
}

}  // namespace memops_hls
