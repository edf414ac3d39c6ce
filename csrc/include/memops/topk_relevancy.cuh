// Compute Relevancy + Retrieval on the GPU: page scores of every kv head (the GQA group or the
// index heads reduced in-kernel, the summary read once), then an exact top-k per row by radix
// select on an order-preserving key, written in ascending page order.
#pragma once

// First: on HIP it defines the __host__/__device__/__forceinline__ that common.h uses.
#include "memops/gpu_compat.h"

#include <cmath>

#include "memops/common.h"
#include "memops/gpu_params.h"
#include "memops/relevancy.h"
#include "memops/topk.h"

namespace memops {

namespace relevancy_detail {

constexpr int kLanesPerPage = 16;
constexpr int kMaxDim = static_cast<int>(kGpuMaxDim);
constexpr int kMaxPerLane = kMaxDim / kLanesPerPage;
constexpr int kThreads = 256;

__device__ __forceinline__ int64_t valid_pages(const int32_t* num_pages, int64_t b, int64_t n) {
  return num_pages == nullptr ? n : min64(max64(num_pages[b], 0), n);
}

// This lane's slice of one representative, kept in the storage type (fewer registers, so more
// pages in flight): elements (i * kLanesPerPage + sub) * VEC + j.
template <typename T, int VEC>
struct LaneSlice {
  gpu::Vec<T, VEC> chunk[kMaxPerLane / VEC];
};

template <typename T, int VEC>
__device__ __forceinline__ void load_slice(const T* rep, int sub, int64_t dim, bool active,
                                           LaneSlice<T, VEC>& out) {
#pragma unroll
  for (int i = 0; i < kMaxPerLane / VEC; ++i) {
    const int64_t d0 = (int64_t(i) * kLanesPerPage + sub) * VEC;
    if (active && d0 < dim) {
      out.chunk[i] = *reinterpret_cast<const gpu::Vec<T, VEC>*>(rep + d0);
    } else {
#pragma unroll
      for (int j = 0; j < VEC; ++j) out.chunk[i].v[j] = static_cast<T>(0.f);
    }
  }
}

template <typename T, int VEC>
__device__ __forceinline__ float lane_dot(const float* q, const LaneSlice<T, VEC>& rep, int sub,
                                          int64_t dim) {
  float acc = 0.f;
#pragma unroll
  for (int i = 0; i < kMaxPerLane / VEC; ++i) {
    const int64_t d0 = (int64_t(i) * kLanesPerPage + sub) * VEC;
    if (d0 < dim) {
#pragma unroll
      for (int j = 0; j < VEC; ++j) acc += q[d0 + j] * static_cast<float>(rep.chunk[i].v[j]);
    }
  }
  return acc;
}

template <typename T, int VEC>
__device__ __forceinline__ float lane_bound(const float* q, const LaneSlice<T, VEC>& lo,
                                            const LaneSlice<T, VEC>& hi, int sub, int64_t dim) {
  float acc = 0.f;
#pragma unroll
  for (int i = 0; i < kMaxPerLane / VEC; ++i) {
    const int64_t d0 = (int64_t(i) * kLanesPerPage + sub) * VEC;
    if (d0 < dim) {
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        const float qd = q[d0 + j];
        acc += fmax32(qd * static_cast<float>(lo.chunk[i].v[j]),
                      qd * static_cast<float>(hi.chunk[i].v[j]));
      }
    }
  }
  return acc;
}

// Score of one page for the whole group of query heads (all lanes of the page's lane group
// return it). `first`/`second` hold representatives 0 and 1; more are read from `page`.
template <typename T, int VEC>
__device__ __forceinline__ float score_page(const RelevancyParams& p, const float* shared_query,
                                            const float* shared_weights, int64_t group,
                                            const T* page, const LaneSlice<T, VEC>& first,
                                            const LaneSlice<T, VEC>& second, int sub,
                                            bool active) {
  const int64_t dim = p.dim;
  float score = 0.f;
  for (int64_t g = 0; g < group; ++g) {
    const float* q = shared_query + g * dim;
    float head;
    if (p.mode == RelevancyMode::kBound) {
      head = gpu::group_sum(lane_bound<T, VEC>(q, first, second, sub, dim), kLanesPerPage);
    } else {
      head = gpu::group_sum(lane_dot<T, VEC>(q, first, sub, dim), kLanesPerPage);
      if (p.mode == RelevancyMode::kIndexer) {
        head = shared_weights[g] * relu32(head);
      } else {
        if (p.reps >= 2)
          head = fmax32(head, gpu::group_sum(lane_dot<T, VEC>(q, second, sub, dim),
                                             kLanesPerPage));
        for (int64_t r = 2; r < p.reps; ++r) {
          LaneSlice<T, VEC> extra;
          load_slice<T, VEC>(page + r * p.summary_stride[3], sub, dim, active, extra);
          head = fmax32(head, gpu::group_sum(lane_dot<T, VEC>(q, extra, sub, dim),
                                             kLanesPerPage));
        }
      }
    }
    score = p.mode == RelevancyMode::kIndexer ? (g == 0 ? head : score + head)
                                              : group_combine(score, head, g == 0, p.reduce);
  }
  return score;
}

}  // namespace relevancy_detail

// Grid: x over page blocks (grid-stride), y over (b, kv) rows. A group of 16 lanes scores one
// page: each lane keeps its slice of the page's representatives in registers and loops over the
// query heads of the group (kept in shared memory as float32), so the summary is read once. Each
// lane group loads two pages before computing either, to keep more loads in flight.
template <typename T, int VEC>
__global__ void __launch_bounds__(relevancy_detail::kThreads)
    relevancy_scores_kernel(RelevancyParams p) {
  using namespace relevancy_detail;
  extern __shared__ float shared_query[];  // [G, D] then weights [G]
  const int64_t row = blockIdx.y, b = row / p.kv_heads, kv = row % p.kv_heads;
  const int64_t group = p.q_heads / p.kv_heads, dim = p.dim;
  float* shared_weights = shared_query + group * dim;
  const T* query = static_cast<const T*>(p.query);
  for (int64_t i = threadIdx.x; i < group * dim; i += blockDim.x) {
    const int64_t g = i / dim, d = i % dim;
    shared_query[i] = static_cast<float>(
        query[b * p.query_stride[0] + (kv * group + g) * p.query_stride[1] + d]);
  }
  if (p.mode == RelevancyMode::kIndexer)
    for (int64_t g = threadIdx.x; g < group; g += blockDim.x)
      shared_weights[g] = p.weights[b * p.q_heads + kv * group + g];
  __syncthreads();

  const int64_t limit = valid_pages(p.num_pages, b, p.pages);
  constexpr int kPagesPerWarp = gpu::kWarpSize / kLanesPerPage;
  const int warp = threadIdx.x / gpu::kWarpSize, lane = threadIdx.x % gpu::kWarpSize;
  const int sub = lane % kLanesPerPage;
  const int64_t warps = blockDim.x / gpu::kWarpSize;
  const int64_t stride = int64_t(gridDim.x) * warps * 2 * kPagesPerWarp;
  const T* summary = static_cast<const T*>(p.summary) + b * p.summary_stride[0] +
                     kv * p.summary_stride[1];
  // The loop bound is uniform across the warp so that every lane takes part in the shuffles.
  for (int64_t base = (int64_t(blockIdx.x) * warps + warp) * 2 * kPagesPerWarp; base < limit;
       base += stride) {
    const int64_t page_a = base + lane / kLanesPerPage, page_b = page_a + kPagesPerWarp;
    const bool active_a = page_a < limit, active_b = page_b < limit;
    const T* rep_a = summary + (active_a ? page_a : 0) * p.summary_stride[2];
    const T* rep_b = summary + (active_b ? page_b : 0) * p.summary_stride[2];
    LaneSlice<T, VEC> first_a, second_a, first_b, second_b;
    load_slice<T, VEC>(rep_a, sub, dim, active_a, first_a);
    load_slice<T, VEC>(rep_a + p.summary_stride[3], sub, dim, active_a && p.reps >= 2, second_a);
    load_slice<T, VEC>(rep_b, sub, dim, active_b, first_b);
    load_slice<T, VEC>(rep_b + p.summary_stride[3], sub, dim, active_b && p.reps >= 2, second_b);
    const float score_a = score_page<T, VEC>(p, shared_query, shared_weights, group, rep_a,
                                             first_a, second_a, sub, active_a);
    const float score_b = score_page<T, VEC>(p, shared_query, shared_weights, group, rep_b,
                                             first_b, second_b, sub, active_b);
    if (sub == 0) {
      if (active_a) p.scores[row * p.pages + page_a] = score_a;
      if (active_b) p.scores[row * p.pages + page_b] = score_b;
    }
  }
}

namespace select_detail {

constexpr int kItems = 4;  // consecutive pages per thread in the ordered compaction
constexpr int kDigitBits = 11;
constexpr int kBins = 1 << kDigitBits;
// Rows of up to this many pages keep their keys in shared memory for all passes.
constexpr int64_t kMaxSharedKeys = 40 * 1024;

// Larger score -> larger key; NaN ranks as -inf; -0 equals +0 (they tie, as in the reference).
__device__ __forceinline__ uint32_t order_key(float s) {
  if (s != s) s = -INFINITY;
  if (s == 0.f) s = 0.f;
  const uint32_t u = __float_as_uint(s);
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

__device__ __forceinline__ int warp_inclusive_scan(int v, int lane) {
  for (int off = 1; off < gpu::kWarpSize; off *= 2) {
    const int n = gpu::shfl_up(v, off);
    if (lane >= off) v += n;
  }
  return v;
}

// Exclusive prefix sum of `v` over the block in thread order; `total` gets the block's sum.
template <int kThreads>
__device__ __forceinline__ int block_exclusive_scan(int v, int* warp_sums, int& total) {
  constexpr int kWarps = kThreads / gpu::kWarpSize;
  const int lane = threadIdx.x % gpu::kWarpSize, warp = threadIdx.x / gpu::kWarpSize;
  const int inclusive = warp_inclusive_scan(v, lane);
  if (lane == gpu::kWarpSize - 1) warp_sums[warp] = inclusive;
  __syncthreads();
  if (warp == 0) {
    const int w = lane < kWarps ? warp_sums[lane] : 0;
    const int w_inclusive = warp_inclusive_scan(w, lane);
    if (lane < kWarps) warp_sums[lane] = w_inclusive - w;
    if (lane == kWarps - 1) warp_sums[kWarps] = w_inclusive;
  }
  __syncthreads();
  const int result = warp_sums[warp] + inclusive - v;
  total = warp_sums[kWarps];
  __syncthreads();
  return result;
}

}  // namespace select_detail

// Records a num_pages[b] outside [0, N] in the value-error word (once per selected row).
__device__ __forceinline__ void report_num_pages(const SelectParams& p, int64_t b) {
  if (p.num_pages != nullptr && (p.num_pages[b] < 0 || p.num_pages[b] > p.pages))
    gpu::report_value_error(p.value_errors, kValueErrorNumPages);
}

// Exact top-k of one (b, kv) row by a block of kThreads threads. Radix select, 11 bits a pass
// from the top (3 passes), finds the key of the k'-th best candidate (k' = k minus the forced
// pages) and how many candidates with exactly that key to take (the lowest page indices: ties go
// to the lower index). A block-wide ordered compaction then writes the chosen pages in ascending
// order; the rest of the row is -1 / -inf. With `keys_in_shared` the keys of the row sit in
// `shared_keys` (p.pages entries), so the scores are read once. Scores are read through L2 only:
// the fused kernel selects rows whose scores other blocks have just written.
template <int kThreads>
__device__ void select_topk_row(const SelectParams& p, int64_t row, uint32_t* shared_keys,
                                bool keys_in_shared) {
  using namespace select_detail;
  constexpr int kWarps = kThreads / gpu::kWarpSize;
  __shared__ unsigned hist[kBins];
  __shared__ int warp_sums[kWarps + 1];
  __shared__ uint32_t chosen_bin;
  __shared__ int chosen_remaining;
  const int64_t b = row / p.heads;
  const float* scores = p.scores + row * p.pages;
  const int64_t valid = p.num_pages == nullptr ? p.pages
                                               : min64(max64(p.num_pages[b], 0), p.pages);
  if (threadIdx.x == 0) report_num_pages(p, b);
  const int64_t forced = num_forced_pages(valid, p.sink_pages, p.recent_pages);
  const int64_t candidates = valid - forced;
  const int64_t budget = max64(p.k - forced, 0);
  const bool take_all = budget >= candidates;
  const auto is_candidate = [&](int64_t page) {
    return page < valid && !is_forced_page(page, valid, p.sink_pages, p.recent_pages);
  };
  const auto key_of = [&](int64_t page) {
    return keys_in_shared ? shared_keys[page] : order_key(gpu::load_l2(scores + page));
  };
  if (keys_in_shared) {
    for (int64_t page = threadIdx.x; page < valid; page += kThreads)
      shared_keys[page] = order_key(gpu::load_l2(scores + page));
    __syncthreads();
  }

  uint32_t prefix = 0, prefix_mask = 0;
  int remaining = static_cast<int>(budget);
  if (budget > 0 && !take_all) {
    for (int pass = 0; pass < 3; ++pass) {
      const int shift = pass == 0 ? 32 - kDigitBits : (pass == 1 ? 32 - 2 * kDigitBits : 0);
      const int bins = pass == 2 ? 1 << (32 - 2 * kDigitBits) : kBins;
      for (int i = threadIdx.x; i < bins; i += kThreads) hist[i] = 0;
      __syncthreads();
      for (int64_t page = threadIdx.x; page < valid; page += kThreads) {
        if (!is_candidate(page)) continue;
        const uint32_t key = key_of(page);
        if ((key & prefix_mask) == prefix)
          gpu::histogram_add(hist, (key >> shift) & static_cast<uint32_t>(bins - 1));
      }
      __syncthreads();
      // Thread t holds bins_per_thread bins counted from the top; the scan finds the bin where
      // the count of larger keys reaches `remaining`.
      const int per_thread = bins / kThreads;
      const int top = bins - 1 - static_cast<int>(threadIdx.x) * per_thread;
      int local = 0;
      for (int j = 0; j < per_thread; ++j) local += hist[top - j];
      int total;
      int before = block_exclusive_scan<kThreads>(local, warp_sums, total);
      if (before < remaining && before + local >= remaining) {
        for (int j = 0; j < per_thread; ++j) {
          if (before + static_cast<int>(hist[top - j]) >= remaining) {
            chosen_bin = static_cast<uint32_t>(top - j);
            chosen_remaining = remaining - before;
            break;
          }
          before += hist[top - j];
        }
      }
      __syncthreads();
      prefix |= chosen_bin << shift;
      prefix_mask |= static_cast<uint32_t>(bins - 1) << shift;
      remaining = chosen_remaining;
      __syncthreads();
    }
  }

  int64_t written = 0, ties_seen = 0;
  const int64_t chunk = int64_t(kThreads) * kItems;
  for (int64_t start = 0; start < valid; start += chunk) {
    const int64_t first = start + int64_t(threadIdx.x) * kItems;
    uint32_t keys[kItems];
    bool candidate[kItems];
    int ties = 0;
#pragma unroll
    for (int j = 0; j < kItems; ++j) {
      candidate[j] = is_candidate(first + j);
      keys[j] = candidate[j] ? key_of(first + j) : 0u;
      ties += candidate[j] && !take_all && budget > 0 && keys[j] == prefix;
    }
    int ties_total;
    int64_t tie_rank = block_exclusive_scan<kThreads>(ties, warp_sums, ties_total) + ties_seen;
    bool chosen[kItems];
    int count = 0;
#pragma unroll
    for (int j = 0; j < kItems; ++j) {
      bool take = first + j < valid && !candidate[j];  // a forced page
      if (candidate[j]) {
        if (take_all) {
          take = true;
        } else if (budget > 0) {
          if (keys[j] > prefix) take = true;
          if (keys[j] == prefix) take = tie_rank++ < remaining;
        }
      }
      chosen[j] = take;
      count += take;
    }
    int count_total;
    int64_t position = written + block_exclusive_scan<kThreads>(count, warp_sums, count_total);
#pragma unroll
    for (int j = 0; j < kItems; ++j) {
      if (!chosen[j]) continue;
      p.top_indices[row * p.k + position] = static_cast<int32_t>(first + j);
      p.top_scores[row * p.k + position] = gpu::load_l2(scores + first + j);
      ++position;
    }
    written += count_total;
    ties_seen += ties_total;
  }
  for (int64_t j = forced + min64(budget, candidates) + threadIdx.x; j < p.k; j += kThreads) {
    p.top_indices[row * p.k + j] = -1;
    p.top_scores[row * p.k + j] = -INFINITY;
  }
}

namespace select_detail {

constexpr int kSmallKeysPerThread = 32;
// select_topk_row_small runs with 256 threads inside the scoring kernel (rows of up to 8192
// pages) and with 1024 threads as a kernel of its own (up to 32768 pages); keys sit in registers.
constexpr int kSmallThreads = 256;
constexpr int kLargeThreads = 1024;
constexpr int64_t kSmallMaxPages = int64_t(kSmallThreads) * kSmallKeysPerThread;
constexpr int64_t kLargeMaxPages = int64_t(kLargeThreads) * kSmallKeysPerThread;
constexpr int kRadixBins = 256;

}  // namespace select_detail

namespace select_detail {

// Shared memory of select_topk_row_small.
template <int kThreads>
struct SmallSelectShared {
  unsigned hist[2][kRadixBins];
  int warp_totals[3][kThreads / gpu::kWarpSize];
  uint32_t warp_min[kThreads / gpu::kWarpSize], warp_max[kThreads / gpu::kWarpSize];
  uint32_t boundary_bin;
  int boundary_remaining, boundary_count;
};

// kKeys: keys per thread, one of the widths of select_topk_row_small >= ceil(valid / kThreads).
// Loops of exactly that width: a block has one multiprocessor to itself, so every idle
// predicated slot costs latency.
// The row is a latency chain, so no load sits behind a per-key branch (each would be waited for
// before the next is issued): all scores are loaded at once, and the chosen ones are written
// with predicated stores at positions counted from a bit mask.
template <int kThreads, int kKeys>
__device__ void select_small_row(const SelectParams& p, int64_t row, int valid,
                                 SmallSelectShared<kThreads>& sh) {
  static_assert(kThreads >= kRadixBins, "one histogram bin per thread at most");
  static_assert(kKeys <= 32, "one bit a key in a 32-bit mask");
  // Scores kept for the output (else loaded again, a group at a time: a dependent trip to L2
  // per group that holds a chosen page): the 1024-thread kernel's 64 registers do not hold two
  // arrays of more than 8; a 256-thread block keeps up to 16 (rows of up to 4096 pages: a
  // static cache at 32K tokens and more has 2049 and more).
  constexpr bool kKeepScores = kKeys <= (kThreads <= kSmallThreads ? 16 : 8);
  const int tid = threadIdx.x, lane = tid % gpu::kWarpSize, warp = tid / gpu::kWarpSize;
  const float* scores = p.scores + row * p.pages;
  // Candidates are the pages [lo, hi); the other valid pages are forced (sinks and recent
  // pages). Page numbers fit 32 bits: a row here has at most kLargeMaxPages.
  const int lo = static_cast<int>(candidate_begin(valid, p.sink_pages));
  const int hi = static_cast<int>(candidate_end(valid, p.sink_pages, p.recent_pages));
  const int candidates = hi - lo, forced = valid - candidates;
  const int64_t budget = max64(p.k - forced, 0);
  const int first = tid * kKeys;

  // A thread's run of pages j0 .. j0 + kCount - 1 into out[0 ..]: at fixed offsets of one
  // pointer when the run is all valid (one address instead of kCount), clamped into the row
  // when it is not.
  const auto load_run = [&](auto& out, int j0) {
    constexpr int kCount = sizeof(out) / sizeof(out[0]);
    if (first + j0 + kCount <= valid) {
#pragma unroll
      for (int j = 0; j < kCount; ++j) out[j] = gpu::load_l2(scores + first + j0 + j);
    } else if (valid > 0) {
#pragma unroll
      for (int j = 0; j < kCount; ++j) out[j] = gpu::load_l2(scores + min(first + j0 + j, valid - 1));
    }
  };
  float raw[kKeys];
#pragma unroll
  for (int j = 0; j < kKeys; ++j) raw[j] = 0.f;
  load_run(raw, 0);
  uint32_t keys[kKeys];
  uint32_t candidate_bits = 0, forced_bits = 0;
#pragma unroll
  for (int j = 0; j < kKeys; ++j) {
    const int page = first + j;
    const bool candidate = page >= lo && page < hi;
    candidate_bits |= static_cast<uint32_t>(candidate) << j;
    forced_bits |= static_cast<uint32_t>(page < valid && !candidate) << j;
    keys[j] = candidate ? order_key(raw[j]) : 0u;
  }
  // The candidates' smallest and largest keys: the leading bits they share need no pass (scores
  // of one row mostly share sign and exponent bits, so a first pass on the top digit would put
  // nearly every key into one bin, all of them contending for one shared counter).
  uint32_t low = 0xffffffffu, high = 0;
#pragma unroll
  for (int j = 0; j < kKeys; ++j) {
    const bool candidate = candidate_bits >> j & 1u;
    low = candidate && keys[j] < low ? keys[j] : low;
    high = candidate && keys[j] > high ? keys[j] : high;
  }
  for (int off = gpu::kWarpSize / 2; off > 0; off /= 2) {
    const uint32_t other_low = gpu::shfl_xor(low, off), other_high = gpu::shfl_xor(high, off);
    low = low < other_low ? low : other_low;
    high = high > other_high ? high : other_high;
  }
  if (lane == 0) {
    sh.warp_min[warp] = low;
    sh.warp_max[warp] = high;
  }
  if (tid < kRadixBins) sh.hist[0][tid] = 0;
  __syncthreads();
  for (int w = 0; w < kThreads / gpu::kWarpSize; ++w) {
    low = low < sh.warp_min[w] ? low : sh.warp_min[w];
    high = high > sh.warp_max[w] ? high : sh.warp_max[w];
  }

  // Chosen candidates: (key & mask) > prefix, plus (key & mask) == prefix when `resolved`, else
  // the first `remaining` of the keys equal to prefix (ties go to the lower page). `open` low
  // bits of the key are still undecided; every candidate shares the bits above them.
  int remaining = static_cast<int>(min64(budget, candidates));
  bool resolved = budget == 0 || budget >= candidates;
  int open = low >= high ? 0 : 32 - gpu::count_leading_zeros(low ^ high);
  uint32_t mask = open == 32 ? 0u : ~((1u << open) - 1u);
  uint32_t prefix = low & mask;
  if (budget == 0) mask = prefix = 0xffffffffu;  // no key compares above: no candidate taken
  for (int pass = 0; open > 0 && !resolved; ++pass) {
    // The next digit: up to 8 bits right below the decided ones.
    const int shift = open > 8 ? open - 8 : 0;
    const uint32_t digit_mask = (1u << (open - shift)) - 1u;
    unsigned* counts = sh.hist[pass & 1];
    // Plain shared atomics: measured faster here than grouping equal bins with match_any.
#pragma unroll
    for (int j = 0; j < kKeys; ++j)
      if ((candidate_bits >> j & 1u) && (keys[j] & mask) == prefix)
        atomicAdd(counts + ((keys[j] >> shift) & digit_mask), 1u);
    // Next pass's histogram; nobody reads it in this pass.
    if (tid < kRadixBins) sh.hist[(pass + 1) & 1][tid] = 0;
    __syncthreads();
    // Thread t < 256 owns bin 255 - t: an inclusive scan counts the keys in this bin and above
    // (threads past the bins add nothing and never hold the boundary).
    const int bin = kRadixBins - 1 - tid;
    const int count = tid < kRadixBins ? static_cast<int>(counts[bin]) : 0;
    int inclusive = warp_inclusive_scan(count, lane);
    if (lane == gpu::kWarpSize - 1) sh.warp_totals[pass % 2][warp] = inclusive;
    __syncthreads();
    for (int w = 0; w < warp; ++w) inclusive += sh.warp_totals[pass % 2][w];
    const int above = inclusive - count;
    if (above < remaining && inclusive >= remaining) {
      sh.boundary_bin = static_cast<uint32_t>(bin);
      sh.boundary_remaining = remaining - above;
      sh.boundary_count = count;
    }
    __syncthreads();
    prefix |= sh.boundary_bin << shift;
    mask |= digit_mask << shift;
    open = shift;
    remaining = sh.boundary_remaining;
    resolved = sh.boundary_count == remaining;
  }
  if (budget >= candidates) mask = prefix = 0;  // every candidate

  // Per thread: pages taken outright, and candidates tied at the boundary key.
  uint32_t above_bits = 0, tied_bits = 0;
#pragma unroll
  for (int j = 0; j < kKeys; ++j) {
    const uint32_t masked = keys[j] & mask;
    const bool candidate = candidate_bits >> j & 1u;
    above_bits |= static_cast<uint32_t>(candidate && (masked > prefix || (masked == prefix && resolved))) << j;
    tied_bits |= static_cast<uint32_t>(candidate && !resolved && masked == prefix) << j;
  }
  const int taken = __popc(forced_bits | above_bits), tied = __popc(tied_bits);
  const int packed = taken | (tied << 16);  // block totals <= kLargeMaxPages < 2^16
  int inclusive = warp_inclusive_scan(packed, lane);
  if (lane == gpu::kWarpSize - 1) sh.warp_totals[2][warp] = inclusive;
  __syncthreads();
  for (int w = 0; w < warp; ++w) inclusive += sh.warp_totals[2][w];
  const int exclusive = inclusive - packed;
  // The row's ties before this thread's are exclusive >> 16; the first `remaining` are taken.
  const int tie_rank = exclusive >> 16;
  uint32_t take_bits = forced_bits | above_bits;
#pragma unroll
  for (int j = 0; j < kKeys; ++j) {
    const int rank = tie_rank + __popc(tied_bits & ((1u << j) - 1u));
    take_bits |= static_cast<uint32_t>((tied_bits >> j & 1u) && rank < remaining) << j;
  }
  const int position = (exclusive & 0xffff) + min(tie_rank, remaining);
  int32_t* top_indices = p.top_indices + row * p.k;
  float* top_scores = p.top_scores + row * p.k;
  // Scores kept, or reloaded eight (four for 12 keys) at a time, each group's loads together.
  constexpr int kGroup = kKeepScores ? kKeys : (kKeys % 8 == 0 ? 8 : 4);
#pragma unroll
  for (int j0 = 0; j0 < kKeys; j0 += kGroup) {
    float group[kGroup];
#pragma unroll
    for (int j = 0; j < kGroup; ++j) group[j] = kKeepScores ? raw[j0 + j] : 0.f;
    if (!kKeepScores && (take_bits >> j0 & ((1u << kGroup) - 1u)) != 0) load_run(group, j0);
#pragma unroll
    for (int j = 0; j < kGroup; ++j) {
      if (take_bits >> (j0 + j) & 1u) {
        const int at = position + __popc(take_bits & ((1u << (j0 + j)) - 1u));
        top_indices[at] = first + j0 + j;
        top_scores[at] = group[j];
      }
    }
  }
  for (int64_t j = forced + min64(budget, candidates) + tid; j < p.k; j += kThreads) {
    top_indices[j] = -1;
    top_scores[j] = -INFINITY;
  }
}

}  // namespace select_detail

// The same selection for rows of up to 32 keys a thread, built for latency (it is the tail of
// the fused scoring kernel): each thread keeps a contiguous run of keys in registers;
// radix select over 8-bit digits from the top (at most four passes, three barriers each, and it
// stops as soon as the boundary digit's pages are all taken); one block-wide scan of packed
// (taken, tied) counts places every chosen page in ascending order.
template <int kThreads>
__device__ void select_topk_row_small(const SelectParams& p, int64_t row) {
  using namespace select_detail;
  __shared__ SmallSelectShared<kThreads> shared;
  const int64_t b = row / p.heads;
  const int64_t valid = p.num_pages == nullptr ? p.pages
                                               : min64(max64(p.num_pages[b], 0), p.pages);
  if (threadIdx.x == 0) report_num_pages(p, b);
  const int64_t per_thread = ceil_div(valid, kThreads);
  const int pages_in_row = static_cast<int>(valid);  // <= kLargeMaxPages (the callers' bound)
  if (per_thread <= 1) return select_small_row<kThreads, 1>(p, row, pages_in_row, shared);
  if (per_thread <= 2) return select_small_row<kThreads, 2>(p, row, pages_in_row, shared);
  if (per_thread <= 4) return select_small_row<kThreads, 4>(p, row, pages_in_row, shared);
  if (per_thread <= 8) return select_small_row<kThreads, 8>(p, row, pages_in_row, shared);
  // 12: rows just past 8 keys a thread (2049 pages: a static cache of 32K tokens) would
  // otherwise run loops of 16.
  if (per_thread <= 12) return select_small_row<kThreads, 12>(p, row, pages_in_row, shared);
  if (per_thread <= 16) return select_small_row<kThreads, 16>(p, row, pages_in_row, shared);
  select_small_row<kThreads, kSmallKeysPerThread>(p, row, pages_in_row, shared);
}

// For a scoring kernel that selects in its last block: counts this block done on its row
// (``done``: per-row counters, zeroed before the launch; ``blocks``: the blocks that score the
// row); the row's last block selects its top-k and returns true (in every thread).
template <int kThreads>
__device__ __forceinline__ bool select_if_last_block(const SelectParams& sp, int64_t row, int* done,
                                                     int blocks) {
  __shared__ bool last_block;
  __threadfence();  // this block's scores are visible device-wide before it counts itself done
  __syncthreads();
  if (threadIdx.x == 0) last_block = atomicAdd(done + row, 1) == blocks - 1;
  __syncthreads();
  if (!last_block) return false;
  __threadfence();
  select_topk_row_small<kThreads>(sp, row);
  return true;
}

// The same for a grid whose x blocks all score the row.
template <int kThreads>
__device__ __forceinline__ void select_if_last_block(const SelectParams& sp, int64_t row, int* done) {
  select_if_last_block<kThreads>(sp, row, done, static_cast<int>(gridDim.x));
}

template <int kThreads>
__global__ void __launch_bounds__(kThreads) select_topk_small_kernel(SelectParams p) {
  select_topk_row_small<kThreads>(p, blockIdx.x);
}

constexpr int kSelectThreads = 512;

// One block per (b, kv) row.
static __global__ void __launch_bounds__(kSelectThreads)
    select_topk_kernel(SelectParams p, bool keys_in_shared) {
  extern __shared__ uint32_t shared_keys[];
  select_topk_row<kSelectThreads>(p, blockIdx.x, shared_keys, keys_in_shared);
}

template <typename T, int VEC>
gpu::Error launch_relevancy_scores(const RelevancyParams& p, int target_blocks,
                                   gpu::Stream stream) {
  using namespace relevancy_detail;
  const int64_t rows = p.batch * p.kv_heads;
  if (rows == 0 || p.pages == 0) return gpu::kSuccess;
  const int64_t pages_per_block = 2 * (kThreads / gpu::kWarpSize) * (gpu::kWarpSize / kLanesPerPage);
  const int64_t blocks_x =
      max64(1, min64(ceil_div(p.pages, pages_per_block), ceil_div(target_blocks, rows)));
  const int64_t group = p.q_heads / p.kv_heads;
  const int shared = static_cast<int>((group * p.dim + group) * sizeof(float));
  if (shared > 48 * 1024) {
    const gpu::Error e =
        gpu::set_max_dynamic_shared(reinterpret_cast<const void*>(&relevancy_scores_kernel<T, VEC>),
                                    shared);
    if (e != gpu::kSuccess) return e;
  }
  const dim3 grid(static_cast<unsigned>(blocks_x), static_cast<unsigned>(rows));
  relevancy_scores_kernel<T, VEC><<<grid, kThreads, shared, stream>>>(p);
  return gpu::last_error();
}

inline gpu::Error launch_select_topk(const SelectParams& p, int64_t rows, gpu::Stream stream) {
  if (rows == 0) return gpu::kSuccess;
  // Short rows: 256 threads; up to 32K pages: 1024 threads (more threads, fewer keys each: the
  // selection of a row is latency on one multiprocessor).
  if (p.pages <= 2048) {
    select_topk_small_kernel<select_detail::kSmallThreads>
        <<<static_cast<unsigned>(rows), select_detail::kSmallThreads, 0, stream>>>(p);
    return gpu::last_error();
  }
  if (p.pages <= select_detail::kLargeMaxPages) {
    select_topk_small_kernel<select_detail::kLargeThreads>
        <<<static_cast<unsigned>(rows), select_detail::kLargeThreads, 0, stream>>>(p);
    return gpu::last_error();
  }
  const bool keys_in_shared = p.pages <= select_detail::kMaxSharedKeys;
  const int shared = keys_in_shared ? static_cast<int>(p.pages * sizeof(uint32_t)) : 0;
  if (shared > 32 * 1024) {
    const gpu::Error e = gpu::set_max_dynamic_shared(
        reinterpret_cast<const void*>(&select_topk_kernel), shared);
    if (e != gpu::kSuccess) return e;
  }
  select_topk_kernel<<<static_cast<unsigned>(rows), kSelectThreads, shared, stream>>>(
      p, keys_in_shared);
  return gpu::last_error();
}

}  // namespace memops
