// Bound-preserving int8 summaries ("minmax_int8"): a minmax page summary stored as int8 codes
// with one power-of-two scale per page, rounded outward so that the dequantised min is never
// above the true min and the dequantised max never below the true max. Shared by the CPU, CUDA,
// HIP and HLS builds; the definition in code is torch_memops/reference.py (quantize_minmax).
//
// Layout: codes int8 [B, Hkv, N, 2, D] (R = 0 min codes a, R = 1 max codes b), scales float32
// [B, Hkv, N]. For a page with finite keys and largest magnitude m = max_d max(|min_d|, |max_d|):
//   scale = 2^e, e the smallest integer >= -149 with 127 * 2^e >= m (so 2^-149 <= scale <= 2^122)
//   a_d = floor(min_d / scale), b_d = ceil(max_d / scale), both in [-127, 127]
// computed exactly (integer arithmetic on the float's bits), so that as real numbers
//   a_d * scale <= min_d and b_d * scale >= max_d.
// Special pages: m == 0 (all keys zero, or no valid token): codes 0, scale 0. A NaN key: codes 0,
// scale NaN (every score of the page is NaN and ranks last, as with a float summary). An infinite
// key (no NaN): a = -127, b = 127 everywhere and scale +inf (the bound is +inf for any non-zero
// query, above every other bound).
//
// Scoring (mode "bound") factors the scale out: score = scale * reduce_g sum_d max(q_d a_d,
// q_d b_d), in float32. Because the scale is a power of two, multiplying by it rounds nothing
// (outside float32's subnormal and overflow ranges), so the score equals the float32 bound of the
// dequantised summary summed in the same order; and since every dequantised term is >= the exact
// term and float rounding is monotonic, it is >= the float32 bound of the exact summary summed in
// that order.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#include "memops/common.h"

namespace memops {

constexpr int kInt8CodeMax = 127;
constexpr int kInt8MinExponent = -149;  // 2^-149, the smallest positive float32

MEMOPS_HD uint32_t float_to_bits(float x) {
#if defined(__CUDA_ARCH__) || defined(__HIP_DEVICE_COMPILE__)
  return __float_as_uint(x);
#else
  uint32_t u;
  std::memcpy(&u, &x, sizeof(u));
  return u;
#endif
}

MEMOPS_HD float bits_to_float(uint32_t u) {
#if defined(__CUDA_ARCH__) || defined(__HIP_DEVICE_COMPILE__)
  return __uint_as_float(u);
#else
  float x;
  std::memcpy(&x, &u, sizeof(x));
  return x;
#endif
}

// 2^e as a float32, for e in [-149, 127].
MEMOPS_HD float pow2_float(int e) {
  return e >= -126 ? bits_to_float(static_cast<uint32_t>(e + 127) << 23)
                   : bits_to_float(1u << (e + 149));
}

// The integer significand and exponent of a finite non-zero |x|: |x| = mant * 2^exp, mant < 2^24.
MEMOPS_HD void split_float(float x, uint32_t& mant, int& exp) {
  const uint32_t u = float_to_bits(x) & 0x7fffffffu;
  const uint32_t biased = u >> 23;
  mant = biased == 0 ? (u & 0x7fffffu) : ((u & 0x7fffffu) | 0x800000u);
  exp = biased == 0 ? -149 : static_cast<int>(biased) - 150;
}

// The smallest e >= -149 with 127 * 2^e >= m, for finite m > 0.
MEMOPS_HD int int8_scale_exponent(float m) {
  uint32_t mant;
  int exp;
  split_float(m, mant, exp);
  int bits = 24;  // bit length of mant (subnormals have fewer)
  uint32_t top = mant;
  while (top < 0x800000u) {
    top <<= 1;
    --bits;
  }
  // With `top` normalised to 24 bits, 127 * 2^(bits - 7) >= mant iff top <= 127 * 2^17.
  const int e = exp + bits - (top <= (127u << 17) ? 7 : 6);
  return e < kInt8MinExponent ? kInt8MinExponent : e;
}

// floor(x / 2^e) (round_up false) or ceil(x / 2^e) (round_up true), exactly, for finite x with
// |x| <= 127 * 2^e.
MEMOPS_HD int32_t quantize_pow2(float x, int e, bool round_up) {
  if (x == 0.f) return 0;
  uint32_t mant;
  int exp;
  split_float(x, mant, exp);
  const int shift = exp - e;  // |x| / 2^e = mant * 2^shift
  uint32_t whole;
  bool fraction;
  if (shift >= 0) {
    whole = mant << shift;  // <= 127, so shift <= 6 here
    fraction = false;
  } else if (shift > -32) {
    whole = mant >> -shift;
    fraction = (mant & ((1u << -shift) - 1u)) != 0u;
  } else {
    whole = 0;
    fraction = true;
  }
  const int32_t magnitude = static_cast<int32_t>(whole);
  const bool negative = (float_to_bits(x) >> 31) != 0u;
  if (!negative) return magnitude + ((round_up && fraction) ? 1 : 0);
  return -magnitude - ((!round_up && fraction) ? 1 : 0);
}

// Page classification by its largest magnitude and NaN flag, and its scale.
MEMOPS_HD float int8_page_scale(float max_abs, bool has_nan, int& exponent) {
  exponent = 0;
  if (has_nan) return NAN;
  if (max_abs == 0.f) return 0.f;
  if (max_abs > 3.402823466e38f) return INFINITY;
  exponent = int8_scale_exponent(max_abs);
  return pow2_float(exponent);
}

// The codes of one element given its page's scale (from int8_page_scale).
MEMOPS_HD void int8_codes(float lo, float hi, float scale, int exponent, int8_t& a, int8_t& b) {
  if (scale != scale || scale == 0.f) {
    a = b = 0;
  } else if (scale > 3.402823466e38f) {
    a = -kInt8CodeMax;
    b = kInt8CodeMax;
  } else {
    a = static_cast<int8_t>(quantize_pow2(lo, exponent, false));
    b = static_cast<int8_t>(quantize_pow2(hi, exponent, true));
  }
}

// |x| as a float, NaN kept.
MEMOPS_HD float abs32(float x) { return bits_to_float(float_to_bits(x) & 0x7fffffffu); }

// Quantises one page's float min/max rows (`dim` elements) into codes and returns its scale.
MEMOPS_HD float quantize_minmax_page(const float* lo, const float* hi, int64_t dim,
                                     int8_t* out_lo, int8_t* out_hi) {
  float max_abs = 0.f;
  bool has_nan = false;
  for (int64_t d = 0; d < dim; ++d) {
    has_nan |= (lo[d] != lo[d]) | (hi[d] != hi[d]);
    const float m = fmax32(abs32(lo[d]), abs32(hi[d]));
    max_abs = m > max_abs ? m : max_abs;
  }
  int exponent;
  const float scale = int8_page_scale(max_abs, has_nan, exponent);
  for (int64_t d = 0; d < dim; ++d) int8_codes(lo[d], hi[d], scale, exponent, out_lo[d], out_hi[d]);
  return scale;
}

}  // namespace memops
