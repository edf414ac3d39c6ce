// Tensor-core building blocks of the CUDA kernels: the m16n8k16 MMA with float32 accumulation,
// the 8x8 register transpose, and 16-bit pair packing. CUDA only (sm_80+ at run time, checked by
// the bindings); the HIP build never includes this header.
//
// Fragment layouts (PTX ISA, "mma.m16n8k16"), lane = 4 * g + t:
//   A 16x16 row-major: a[0] = (row g, cols 2t, 2t+1), a[1] = (row g+8, same cols),
//                      a[2] = (row g, cols 2t+8, 2t+9), a[3] = (row g+8, cols 2t+8, 2t+9)
//   B 16x8:            b[0] = (rows 2t, 2t+1, col g), b[1] = (rows 2t+8, 2t+9, col g)
//   C 16x8 float32:    c[0], c[1] = (row g, cols 2t, 2t+1), c[2], c[3] = (row g+8, same cols)
// The lower index of a pair sits in the low 16 bits of its register.
#pragma once

#if defined(__HIPCC__)
#error "memops/mma.cuh is CUDA only"
#endif

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

namespace memops {
namespace mma {

// The toolkit's paired type of a 16-bit storage type.
template <typename T>
struct Pair;
template <>
struct Pair<__nv_bfloat16> {
  using type = __nv_bfloat162;
};
template <>
struct Pair<__half> {
  using type = __half2;
};

template <typename T>
__device__ __forceinline__ typename Pair<T>::type as_pair(uint32_t bits) {
  return *reinterpret_cast<const typename Pair<T>::type*>(&bits);
}

template <typename T>
__device__ __forceinline__ uint32_t as_bits(typename Pair<T>::type pair) {
  return *reinterpret_cast<const uint32_t*>(&pair);
}

// Element-wise max / min of two pairs; a NaN of either operand is kept.
template <typename T>
__device__ __forceinline__ uint32_t max_pair(uint32_t a, uint32_t b) {
  return as_bits<T>(__hmax2_nan(as_pair<T>(a), as_pair<T>(b)));
}
template <typename T>
__device__ __forceinline__ uint32_t min_pair(uint32_t a, uint32_t b) {
  return as_bits<T>(__hmin2_nan(as_pair<T>(a), as_pair<T>(b)));
}

// Two floats rounded to the 16-bit type, `lo` in the low half.
template <typename T>
__device__ __forceinline__ uint32_t pack_pair(float lo, float hi);
template <>
__device__ __forceinline__ uint32_t pack_pair<__nv_bfloat16>(float lo, float hi) {
  return as_bits<__nv_bfloat16>(__floats2bfloat162_rn(lo, hi));
}
template <>
__device__ __forceinline__ uint32_t pack_pair<__half>(float lo, float hi) {
  return as_bits<__half>(__floats2half2_rn(lo, hi));
}

// c += a * b (m16n8k16, float32 accumulators).
template <typename T>
__device__ __forceinline__ void mma_16816(float (&c)[4], const uint32_t (&a)[4],
                                          const uint32_t (&b)[2]);
template <>
__device__ __forceinline__ void mma_16816<__nv_bfloat16>(float (&c)[4], const uint32_t (&a)[4],
                                                         const uint32_t (&b)[2]) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, "
      "{%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#else
  __trap();
#endif
}
template <>
__device__ __forceinline__ void mma_16816<__half>(float (&c)[4], const uint32_t (&a)[4],
                                                  const uint32_t (&b)[2]) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, "
      "{%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#else
  __trap();
#endif
}

// Transpose of an 8x8 matrix of 16-bit elements held as (row g, cols 2t, 2t+1) per lane: the
// lane then holds (rows 2t, 2t+1 of column g), i.e. the B-fragment pair of column g.
__device__ __forceinline__ uint32_t transpose_8x8(uint32_t x) {
  uint32_t y;
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm("movmatrix.sync.aligned.m8n8.trans.b16 %0, %1;\n" : "=r"(y) : "r"(x));
#else
  y = x;
  __trap();
#endif
  return y;
}

// Word i (0..3) of a 16-byte vector.
__device__ __forceinline__ uint32_t word(const uint4& v, int i) {
  return i == 0 ? v.x : (i == 1 ? v.y : (i == 2 ? v.z : v.w));
}

__device__ __forceinline__ uint4 load16(const void* p) { return *static_cast<const uint4*>(p); }

// A 16-byte read-only load that does not allocate in L1: data read once (a summary streamed by
// the scoring kernel) then leaves L1 to the lines that are reused.
__device__ __forceinline__ uint4 load16_stream(const void* p) {
  uint4 v;
  asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(p));
  return v;
}

// Asks L2 to fetch the 128-byte line holding `p` (no register, nothing waits for it).
__device__ __forceinline__ void prefetch_l2(const void* p) {
  asm volatile("prefetch.global.L2 [%0];" ::"l"(p));
}

}  // namespace mma
}  // namespace memops
