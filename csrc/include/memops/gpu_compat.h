// The one portability layer between CUDA and HIP for the GPU kernels of memops. Kernel headers
// (*.cuh) use only what is defined here, so the same sources compile with nvcc and hipcc.
#pragma once

#if defined(__HIPCC__)
#include <hip/hip_bfloat16.h>
#include <hip/hip_fp16.h>
#include <hip/hip_runtime.h>
#else
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#endif

#include <cstdint>

namespace memops {
namespace gpu {

#if defined(__HIPCC__)
using Stream = hipStream_t;
// The toolkit's 16-bit float types (the torch bindings use c10::Half / c10::BFloat16 instead).
using Half = __half;
using BFloat16 = hip_bfloat16;
using Error = hipError_t;
constexpr Error kSuccess = hipSuccess;
constexpr Error kInvalidValue = hipErrorInvalidValue;
// gfx9 (MI100/MI210/MI300) runs wavefronts of 64 lanes.
constexpr int kWarpSize = 64;
inline Error last_error() { return hipGetLastError(); }
inline Error set_max_dynamic_shared(const void* kernel, int bytes) {
  return hipFuncSetAttribute(kernel, hipFuncAttributeMaxDynamicSharedMemorySize, bytes);
}
template <typename T>
__device__ __forceinline__ T shfl_xor(T v, int lane_mask, int width = kWarpSize) {
  return __shfl_xor(v, lane_mask, width);
}
template <typename T>
__device__ __forceinline__ T shfl_up(T v, int delta) {
  return __shfl_up(v, delta);
}
#else
using Stream = cudaStream_t;
using Half = __half;
using BFloat16 = __nv_bfloat16;
using Error = cudaError_t;
constexpr Error kSuccess = cudaSuccess;
constexpr Error kInvalidValue = cudaErrorInvalidValue;
constexpr int kWarpSize = 32;
inline Error last_error() { return cudaGetLastError(); }
inline Error set_max_dynamic_shared(const void* kernel, int bytes) {
  return cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes);
}
constexpr unsigned kFullMask = 0xffffffffu;
template <typename T>
__device__ __forceinline__ T shfl_xor(T v, int lane_mask, int width = kWarpSize) {
  return __shfl_xor_sync(kFullMask, v, lane_mask, width);
}
template <typename T>
__device__ __forceinline__ T shfl_up(T v, int delta) {
  return __shfl_up_sync(kFullMask, v, delta);
}
#endif

// Leading zero bits of a 32-bit word (32 for zero); __clz is the same intrinsic on both.
__device__ __forceinline__ int count_leading_zeros(uint32_t v) {
  return __clz(static_cast<int>(v));
}

// Adds 1 to hist[bin] from every active lane. Where the hardware can group lanes by value
// (CUDA sm_70+), one lane per distinct bin does the add: score keys of a row often share their
// high bits, and same-address shared-memory atomics serialise.
__device__ __forceinline__ void histogram_add(unsigned* hist, unsigned bin) {
#if !defined(__HIPCC__) && defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 700
  const unsigned peers = __match_any_sync(__activemask(), bin);
  const int leader = __ffs(peers) - 1;
  if (static_cast<int>(threadIdx.x % kWarpSize) == leader) atomicAdd(hist + bin, __popc(peers));
#else
  atomicAdd(hist + bin, 1u);
#endif
}

// A float written by another block of the same kernel (published with a fence and an atomic):
// read from L2, never from this multiprocessor's L1. On HIP a plain load: the topk selection
// there runs in a kernel of its own, and the sparse_apply merge reads after its own
// __threadfence(), a device-scope fence, which on gfx9 invalidates the L1.
__device__ __forceinline__ float load_l2(const float* p) {
#if defined(__HIPCC__)
  return *p;
#else
  return __ldcg(p);
#endif
}
__device__ __forceinline__ int32_t load_l2(const int32_t* p) {
#if defined(__HIPCC__)
  return *p;
#else
  return __ldcg(p);
#endif
}

// 16-byte (or narrower) vector of VEC elements of T, loaded and stored in one access.
template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Vec {
  T v[VEC];
};

template <typename T, int VEC>
__device__ __forceinline__ void load_floats(const T* src, float* dst) {
  const Vec<T, VEC> x = *reinterpret_cast<const Vec<T, VEC>*>(src);
#pragma unroll
  for (int i = 0; i < VEC; ++i) dst[i] = static_cast<float>(x.v[i]);
}

template <typename T, int VEC>
__device__ __forceinline__ void store_floats(T* dst, const float* src) {
  Vec<T, VEC> x;
#pragma unroll
  for (int i = 0; i < VEC; ++i) x.v[i] = static_cast<T>(src[i]);
  *reinterpret_cast<Vec<T, VEC>*>(dst) = x;
}

// Sum over the `width` consecutive lanes of a lane group (width a power of two <= warp size).
__device__ __forceinline__ float group_sum(float v, int width) {
  for (int off = width / 2; off > 0; off /= 2) v += shfl_xor(v, off, width);
  return v;
}

__device__ __forceinline__ float warp_max(float v) {
  for (int off = kWarpSize / 2; off > 0; off /= 2) {
    const float o = shfl_xor(v, off);
    v = o > v ? o : v;
  }
  return v;
}

__device__ __forceinline__ float warp_sum(float v) { return group_sum(v, kWarpSize); }


// ORs `bits` into the value-error word (gpu_params.h), if there is one and a bit is set. Only
// out-of-range values reach the atomic, so valid inputs pay a compare.
__device__ __forceinline__ void report_value_error(int32_t* word, int32_t bits) {
  if (word != nullptr && bits != 0) atomicOr(word, bits);
}

}  // namespace gpu
}  // namespace memops
