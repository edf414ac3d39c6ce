// Framework-free basics shared by the CPU, CUDA, HIP and HLS builds of the memops kernels.
// Nothing here includes torch: kernels take raw pointers, sizes and element strides.
#pragma once

#include <cstdint>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define MEMOPS_HD __host__ __device__ __forceinline__
#else
#define MEMOPS_HD inline
#endif

namespace memops {

enum class SummaryMode : int { kMinMax = 0, kMean = 1 };
enum class RelevancyMode : int { kBound = 0, kDot = 1, kIndexer = 2 };
enum class GroupReduce : int { kMax = 0, kSum = 1 };

MEMOPS_HD int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
MEMOPS_HD int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }
MEMOPS_HD int64_t max64(int64_t a, int64_t b) { return a > b ? a : b; }
// NaN-propagating max, like torch.maximum: the reference's scores keep a NaN of either operand.
// `|`, not `||`: no short-circuit branch, so compilers emit compare-and-select (and vectorise
// loops of it) instead of a data-dependent jump that random data mispredicts half the time.
MEMOPS_HD float fmax32(float a, float b) { return ((a > b) | (a != a)) ? a : b; }
MEMOPS_HD float fmin32(float a, float b) { return ((a < b) | (a != a)) ? a : b; }
// NaN-propagating relu, like torch.relu: NaN stays NaN (`x > 0 ? x : 0` would map it to 0).
MEMOPS_HD float relu32(float x) { return ((x > 0.f) | (x != x)) ? x : 0.f; }

// Element conversion. Every storage type used here (float, c10::Half, c10::BFloat16, __half,
// __nv_bfloat16, half from hls_half.h) converts to and from float with a cast.
template <typename T>
MEMOPS_HD float to_float(T x) {
  return static_cast<float>(x);
}
template <typename T>
MEMOPS_HD T from_float(float x) {
  return static_cast<T>(x);
}

// Number of valid tokens of page `page` when the row holds `length` valid tokens.
MEMOPS_HD int64_t page_valid_tokens(int64_t page, int64_t page_size, int64_t length) {
  const int64_t first = page * page_size;
  return first >= length ? 0 : min64(page_size, length - first);
}

}  // namespace memops
