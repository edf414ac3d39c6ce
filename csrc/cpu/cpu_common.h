// Helpers shared by the CPU bindings: dtype dispatch and the grain size of parallel loops.
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <c10/util/Half.h>

#include <cstdint>
#include <cstring>
#include <optional>

#include "memops/common.h"

#define MEMOPS_DISPATCH_FLOAT(TYPE, NAME, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, TYPE, NAME, __VA_ARGS__)

namespace memops {

// float16 -> float32 without a branch, so loops of it vectorise (c10::Half's conversion is a
// function of several branches that stops vectorisation: prepare_memory ran 11x slower in
// float16 than in bfloat16). Exact for every finite value and infinity: the exponent and mantissa
// are moved into place and one multiplication by 2^112 rebiases the exponent (subnormals become
// normals exactly); infinities and NaNs get the all-ones exponent back, keeping their payload.
// Same value as c10's for every float16 (tests/test_prepare_memory.py checks all 65536).
template <>
inline float to_float<c10::Half>(c10::Half x) {
  const uint32_t h = x.x;
  uint32_t bits = (h & 0x7fffu) << 13;
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  f *= 0x1p112f;
  std::memcpy(&bits, &f, sizeof(f));
  bits |= (h & 0x7c00u) == 0x7c00u ? 0x7f800000u : 0u;
  bits |= (h & 0x8000u) << 16;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}

// Rows per task so that one task touches at least ~64K elements; small problems stay serial.
inline int64_t grain_for(int64_t elements_per_row) {
  const int64_t target = 1 << 16;
  return elements_per_row >= target ? 1 : target / (elements_per_row > 0 ? elements_per_row : 1);
}

// Valid length of batch row b: seq_lens[b] or all S tokens.
inline int64_t row_length(const int32_t* lens, int64_t b, int64_t num_tokens) {
  return lens == nullptr ? num_tokens : lens[b];
}

// Eight lanes of float as a GCC/Clang vector type: two SSE (or NEON) registers in the baseline
// build, one AVX register in an avx2 clone. Lane-wise arithmetic is the scalar arithmetic, so a
// loop over independent values vectorised this way changes no bit.
typedef float f32x8 __attribute__((vector_size(32)));

inline f32x8 load8(const float* p) {
  f32x8 v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

// Hot CPU loops are compiled twice on x86-64, for AVX2 and for the baseline ISA, and the loader
// picks one for the machine (GCC/Clang function multiversioning). Not "fma": contracting a*b + c
// would change the bits that the HLS kernel and the reference must match.
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define MEMOPS_CPU_MULTIVERSION __attribute__((target_clones("avx2", "default")))
#else
#define MEMOPS_CPU_MULTIVERSION
#endif

inline const int32_t* optional_int_ptr(const std::optional<at::Tensor>& t, at::Tensor& holder) {
  if (!t.has_value()) return nullptr;
  holder = t->contiguous();
  return holder.data_ptr<int32_t>();
}

}  // namespace memops
