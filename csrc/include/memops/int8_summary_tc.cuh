// Compute Relevancy + Retrieval on int8 summaries with tensor cores (CUDA sm_80+, float16 or
// bfloat16 queries, D of 64 or 128, GQA groups of up to 8 heads), the selection fused as in
// topk_relevancy_tc.cuh (the last block of a row selects it).
//
// The structure of relevancy_tc_kernel's bound mode: a warp scores tiles of 16 pages for every
// head of the group as S^T [16 pages x 8 heads] = Codes [16 x 2D] . Q^T [2D x 8] with
//   sum_d max(q_d a_d, q_d b_d) = q+ . max(a, b) + q- . min(a, b),  q+ = max(q, 0), q- = min(q, 0),
// times the page's scale after the group reduction (quantize.h). The codes (integers in
// [-128, 127]) convert exactly to the query's 16-bit type in registers, two at a time, by bit
// operations and one paired add (code_pair); each product of a 16-bit query element and a code
// is exact in float32. A lane loads 16 codes of a row in one 16-byte access, and a warp keeps two
// tiles (32 pages, 8 KB) in flight, as many bytes as the 16-bit kernel's one tile. A head score
// that comes out non-finite (an inf or NaN query element, where 0 * inf appears, or an
// overflow) is computed again with the scalar formula of relevancy.h.
#pragma once

#include "memops/int8_summary.cuh"
#include "memops/mma.cuh"
#include "memops/topk_relevancy_tc.cuh"

namespace memops {

namespace int8_tc {

constexpr int kWarps = 8;
constexpr int kThreads = kWarps * 32;
constexpr int kTilePages = 16;
constexpr int kTilesPerWarp = 2;  // tiles a warp loads before computing either

// Codes 2 * half and 2 * half + 1 (bytes) of `w` as a pair of the 16-bit type T, exactly.
// The bytes are spread to the low bytes of the two 16-bit halves; then
//   float16:  0x6400 | (byte ^ 0x80) is 1024 + code + 128, minus 1152 (0x6480) gives the code;
//   bfloat16: X = 0x4300 | (byte & 0x7f) is 128 + (byte & 0x7f), K = 0xC300 | (byte & 0x80) is
//             -128 (code >= 0) or -256 (code < 0), and X + K is the code.
// Every operand and result is an integer of at most 11 (float16) or 8 (bfloat16) significant
// bits, so the paired add is exact.
template <typename T>
__device__ __forceinline__ uint32_t code_pair(uint32_t w, int half);
template <>
__device__ __forceinline__ uint32_t code_pair<__half>(uint32_t w, int half) {
  const uint32_t spread = __byte_perm(w, 0u, half ? 0x4342 : 0x4140);
  const uint32_t x = spread ^ 0x64806480u;
  return mma::as_bits<__half>(
      __hsub2(mma::as_pair<__half>(x), mma::as_pair<__half>(0x64806480u)));
}
template <>
__device__ __forceinline__ uint32_t code_pair<__nv_bfloat16>(uint32_t w, int half) {
  const uint32_t spread = __byte_perm(w, 0u, half ? 0x4342 : 0x4140);
  const uint32_t x = (spread & 0x007f007fu) | 0x43004300u;
  const uint32_t k = (spread & 0x00800080u) | 0xC300C300u;
  return mma::as_bits<__nv_bfloat16>(
      __hadd2(mma::as_pair<__nv_bfloat16>(x), mma::as_pair<__nv_bfloat16>(k)));
}

}  // namespace int8_tc

// Grid: x = blocks of one row (grid-stride over the row's tile pairs), y = (b, kv) rows.
// Lane 4g + t: pages g and g + 8 of a tile; its 16-byte load c of a code row holds elements
// 64c + 16t .. 64c + 16t + 15, which feed k-steps 4c .. 4c + 3 (elements 64c + 16t + 4h + 0, 1 in
// a[0], a[1] and + 2, 3 in a[2], a[3] of k-step 4c + h); the query fragments use the same order.
// `done`: rows zeroed ints (the fused selection) or nullptr.
template <typename T, int D>
__global__ void __launch_bounds__(int8_tc::kThreads, 2)
    relevancy_int8_tc_kernel(RelevancyInt8Params p, SelectParams sp, int* done) {
  using namespace int8_tc;
  static_assert(D % 64 == 0 && D <= 128, "D: 64-code runs, registers for D <= 128");
  static_assert(kThreads == select_detail::kSmallThreads, "the last block selects its row");
  constexpr int kChunks = D / 64;  // 16-byte loads per code row and lane
  constexpr int kSteps = D / 16;   // k-steps of one row

  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int g = lane / 4, t = lane % 4;
  const int64_t row = blockIdx.y, b = row / p.kv_heads, kv = row % p.kv_heads;
  const int group = static_cast<int>(p.q_heads / p.kv_heads);
  const T* query = static_cast<const T*>(p.query) + b * p.query_stride[0] +
                   kv * group * p.query_stride[1];
  const T* q_row = query + min64(g, group - 1) * p.query_stride[1];

  // B fragments of head g: k-step 4c + h holds elements 64c + 16t + 4h + {0, 1} and + {2, 3}.
  // (Split into max(q, 0) and min(q, 0) per k-step: two instructions cheaper than 16 registers.)
  uint32_t q_frag[kSteps][2];
#pragma unroll
  for (int c = 0; c < kChunks; ++c) {
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const uint4 v =
          g < group ? mma::load16(q_row + 64 * c + 16 * t + 8 * half) : make_uint4(0, 0, 0, 0);
#pragma unroll
      for (int h = 0; h < 2; ++h)
#pragma unroll
        for (int j = 0; j < 2; ++j) q_frag[4 * c + 2 * half + h][j] = mma::word(v, 2 * h + j);
    }
  }

  const int8_t* codes = p.codes + b * p.code_stride[0] + kv * p.code_stride[1];
  const float* scales = p.scales + b * p.scale_stride[0] + kv * p.scale_stride[1];
  const int64_t limit = relevancy_detail::valid_pages(p.num_pages, b, p.pages);
  const int64_t tiles = ceil_div(limit, kTilePages);
  for (int64_t first = (int64_t(blockIdx.x) * kWarps + warp) * kTilesPerWarp; first < tiles;
       first += int64_t(gridDim.x) * kWarps * kTilesPerWarp) {
    uint4 data[kTilesPerWarp][2][2][kChunks];  // [tile][page g / g + 8][min / max row][load]
    float scale[kTilesPerWarp][2];
#pragma unroll
    for (int i = 0; i < kTilesPerWarp; ++i) {
#pragma unroll
      for (int m = 0; m < 2; ++m) {
        const int64_t page = (first + i) * kTilePages + g + 8 * m;
        const bool valid = page < limit;
        const int8_t* src = codes + page * p.code_stride[2] + 16 * t;
#pragma unroll
        for (int r = 0; r < 2; ++r)
#pragma unroll
          for (int c = 0; c < kChunks; ++c)
            data[i][m][r][c] = valid ? mma::load16(src + r * p.code_stride[3] + 64 * c)
                                     : make_uint4(0, 0, 0, 0);
        scale[i][m] = valid && t == 0 ? scales[page * p.scale_stride[2]] : 0.f;
      }
    }

    float acc[kTilesPerWarp][4];
#pragma unroll
    for (int i = 0; i < kTilesPerWarp; ++i)
#pragma unroll
      for (int j = 0; j < 4; ++j) acc[i][j] = 0.f;
#pragma unroll
    for (int c = 0; c < kChunks; ++c) {
#pragma unroll
      for (int h = 0; h < 4; ++h) {
        const int s = 4 * c + h;
        const uint32_t q_pos[2] = {mma::max_pair<T>(q_frag[s][0], 0u),
                                   mma::max_pair<T>(q_frag[s][1], 0u)};
        const uint32_t q_neg[2] = {mma::min_pair<T>(q_frag[s][0], 0u),
                                   mma::min_pair<T>(q_frag[s][1], 0u)};
#pragma unroll
        for (int i = 0; i < kTilesPerWarp; ++i) {
          uint32_t hi[4], lo[4];
#pragma unroll
          for (int j = 0; j < 2; ++j) {
            // a[2j + m]: page g + 8m, elements 64c + 16t + 4h + 2j, + 1 (word h of load c).
#pragma unroll
            for (int m = 0; m < 2; ++m) {
              const uint32_t a = int8_tc::code_pair<T>(mma::word(data[i][m][0][c], h), j);
              const uint32_t bb = int8_tc::code_pair<T>(mma::word(data[i][m][1][c], h), j);
              hi[2 * j + m] = mma::max_pair<T>(a, bb);
              lo[2 * j + m] = mma::min_pair<T>(a, bb);
            }
          }
          mma::mma_16816<T>(acc[i], hi, q_pos);
          mma::mma_16816<T>(acc[i], lo, q_neg);
        }
      }
    }

    // acc[i][0], [1]: page g, heads 2t, 2t + 1; acc[i][2], [3]: page g + 8, the same heads.
#pragma unroll
    for (int i = 0; i < kTilesPerWarp; ++i) {
#pragma unroll
      for (int m = 0; m < 2; ++m) {
        const int64_t page = (first + i) * kTilePages + g + 8 * m;
        const bool valid = page < limit;
        float combined = 0.f;
        bool has = false;
#pragma unroll
        for (int j = 0; j < 2; ++j) {
          const int head = 2 * t + j;
          float s = acc[i][2 * m + j];
          if (head < group && valid && !isfinite(s)) {
            const int8_t* src = codes + page * p.code_stride[2];
            s = score_bound(query + head * p.query_stride[1], src, src + p.code_stride[3], D);
          }
          if (head < group) {
            combined = group_combine(combined, s, !has, p.reduce);
            has = true;
          }
        }
        // The quad's lanes hold heads 2t, 2t + 1 of the same page.
#pragma unroll
        for (int off = 1; off < 4; off *= 2) {
          const float other = __shfl_xor_sync(0xffffffffu, combined, off);
          const bool other_has = __shfl_xor_sync(0xffffffffu, static_cast<int>(has), off) != 0;
          if (other_has) combined = group_combine(combined, other, !has, p.reduce);
          has = has || other_has;
        }
        if (t == 0 && valid) p.scores[row * p.pages + page] = scale[i][m] * combined;
      }
    }
  }

  if (done != nullptr) select_if_last_block<relevancy_tc::kThreads>(sp, row, done);
}

// Scores (and, with `done`, selects) on tensor cores; the caller checked int8_tc_supported.
// As many blocks as fit at once (`resident_blocks`), spread over the rows, at least one a row.
template <typename T>
gpu::Error launch_relevancy_int8_tc(const RelevancyInt8Params& p, const SelectParams& sp,
                                    int* done, int resident_blocks, gpu::Stream stream) {
  using namespace int8_tc;
  const int64_t rows = p.batch * p.kv_heads;
  // Without pages there is nothing to score, but a fused selection still pads the rows.
  if (rows == 0 || (p.pages == 0 && done == nullptr)) return gpu::kSuccess;
  const int64_t tiles = ceil_div(p.pages, kTilePages);
  const int64_t blocks_x = max64(
      1, min64(ceil_div(tiles, kWarps * kTilesPerWarp), resident_blocks / max64(rows, 1)));
  const dim3 grid(static_cast<unsigned>(blocks_x), static_cast<unsigned>(rows));
  if (p.dim == 64)
    relevancy_int8_tc_kernel<T, 64><<<grid, kThreads, 0, stream>>>(p, sp, done);
  else
    relevancy_int8_tc_kernel<T, 128><<<grid, kThreads, 0, stream>>>(p, sp, done);
  return gpu::last_error();
}

}  // namespace memops
