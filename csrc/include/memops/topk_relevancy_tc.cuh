// Compute Relevancy + Retrieval on tensor cores (CUDA sm_80+, 16-bit summaries, D of 64 or 128):
// `bound` and `dot` (one or two representatives) for GQA groups of up to 8 heads, and the
// `indexer` for up to 64 index heads (indexer_tc_kernel below).
//
// A warp scores a tile of 16 pages for every head of the group as one small matrix product
// S^T [16 pages x 8 heads] = Summary [16 x K] . Q^T [K x 8]:
//   bound: sum_d max(q lo, q hi) = q+ . max(lo, hi) + q- . min(lo, hi) with q+ = max(q, 0) and
//          q- = min(q, 0); each product is exact in float32 (one factor is the query element, the
//          other its min or max or zero), so K = 2D runs on the tensor cores with 16-bit inputs.
//   dot:   q . rep_r for each representative, then the max over r.
// Where that is not exact (a summary or query holding inf or NaN, where 0 * inf appears) the
// score comes out non-finite and the page is scored again with the scalar formula of
// relevancy.h, so every finite and non-finite case matches the reference.
//
// Fused selection: every block counts itself done on its row; the last block of a row selects
// the row's top-k (select_topk_row_small, rows of up to 8192 pages) while the other rows are
// still being scored.
#pragma once

#include "memops/mma.cuh"
#include "memops/topk_relevancy.cuh"

namespace memops {

namespace relevancy_tc {

constexpr int kWarps = 8;
constexpr int kThreads = kWarps * 32;
constexpr int kTilePages = 16;
constexpr int kMaxIndexHeads = static_cast<int>(kTensorCoreMaxIndexHeads);

// The exact score of one head on one page (the rare non-finite case), as the CPU computes it.
template <typename T>
__device__ float exact_head_score(const RelevancyParams& p, const T* q, const T* page) {
  if (p.mode == RelevancyMode::kBound)
    return score_bound(q, page, page + p.summary_stride[3], p.dim);
  return score_dot(q, page, p.summary_stride[3], p.reps, p.dim);
}


}  // namespace relevancy_tc

// The tiles of (b, kv) row `row` that block `block` of the row's `blocks` scores (a stride of
// `blocks` tiles per warp): the work of one block of relevancy_tc_kernel, and of a scoring item
// of the one-launch decode step (topk_sparse_apply_tc.cuh).
// kReps: representatives loaded per page (2 for bound).
template <typename T, int D, int kReps, bool kBound>
__device__ __forceinline__ void score_row_tiles_tc(const RelevancyParams& p, int64_t row,
                                                   int64_t block, int64_t blocks) {
  using namespace relevancy_tc;
  static_assert(D % 32 == 0 && D <= 128, "D: 32-element chunks, registers for D <= 128");
  static_assert(!kBound || kReps == 2, "bound reads min and max");
  constexpr int kChunks = D / 32;  // 16-byte loads per page row and lane
  constexpr int kSteps = D / 16;   // k-steps of one representative

  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int g = lane / 4, t = lane % 4;
  const int64_t b = row / p.kv_heads, kv = row % p.kv_heads;
  const int group = static_cast<int>(p.q_heads / p.kv_heads);
  const T* query = static_cast<const T*>(p.query);
  const T* q_row = query + b * p.query_stride[0] + (kv * group + min64(g, group - 1)) *
                                                       p.query_stride[1];
  const T* summary = static_cast<const T*>(p.summary) + b * p.summary_stride[0] +
                     kv * p.summary_stride[1];
  const int64_t limit = relevancy_detail::valid_pages(p.num_pages, b, p.pages);
  const int64_t tiles = ceil_div(limit, kTilePages);
  const int64_t tile_stride = blocks * kWarps;
  // Each warp asks L2 for its next tile while it scores this one: lane l for representative
  // l / 16 of page l % 16. With the summary read past L1 (load16_stream), measured on an H200
  // (tools/probe_scoring.cu): 11-13 % faster at Llama-3-8B and MHA batch 8, 32K; either alone
  // gained less (the prefetch alone lost).
  const auto prefetch_tile = [&](int64_t tile) {
    const int64_t page = tile * kTilePages + lane % 16;
    const int r = lane / 16;
    if (page < limit && r < kReps) {  // a page inside the row: its tile is one of the row's
      const char* rep = reinterpret_cast<const char*>(summary + page * p.summary_stride[2] +
                                                      r * p.summary_stride[3]);
#pragma unroll
      for (int line = 0; line < int(D * sizeof(T)) / 128; ++line) mma::prefetch_l2(rep + 128 * line);
    }
  };
  prefetch_tile(block * kWarps + warp);

  // B fragments: head g, elements 32c + 8t .. 32c + 8t + 7 of chunk c (k-steps 2c and 2c + 1).
  // The same element order is used for the summary rows, so the products pair up. (bound splits
  // them into max(q, 0) and min(q, 0) per tile: two instructions cheaper than 16 registers.)
  uint32_t q_frag[kSteps][2];
#pragma unroll
  for (int c = 0; c < kChunks; ++c) {
    const uint4 v = g < group ? mma::load16(q_row + 32 * c + 8 * t) : make_uint4(0, 0, 0, 0);
#pragma unroll
    for (int h = 0; h < 2; ++h)
#pragma unroll
      for (int j = 0; j < 2; ++j) q_frag[2 * c + h][j] = mma::word(v, 2 * h + j);
  }

  for (int64_t tile = block * kWarps + warp; tile < tiles; tile += tile_stride) {
    prefetch_tile(tile + tile_stride);
    const int64_t page_lo = tile * kTilePages + g, page_hi = page_lo + 8;
    const bool valid_lo = page_lo < limit, valid_hi = page_hi < limit;
    const T* rows[2] = {summary + page_lo * p.summary_stride[2],
                        summary + page_hi * p.summary_stride[2]};
    uint4 data[2][kReps][kChunks];  // [page g / g + 8][rep][chunk]
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      const bool valid = i == 0 ? valid_lo : valid_hi;
#pragma unroll
      for (int r = 0; r < kReps; ++r)
#pragma unroll
        for (int c = 0; c < kChunks; ++c)
          data[i][r][c] = valid ? mma::load16_stream(rows[i] + r * p.summary_stride[3] +
                                                         32 * c + 8 * t)
                                : make_uint4(0, 0, 0, 0);
    }

    float acc[kBound ? 1 : kReps][4];
#pragma unroll
    for (int r = 0; r < (kBound ? 1 : kReps); ++r)
#pragma unroll
      for (int i = 0; i < 4; ++i) acc[r][i] = 0.f;
#pragma unroll
    for (int c = 0; c < kChunks; ++c) {
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        if (kBound) {
          uint32_t hi[4], lo[4];
#pragma unroll
          for (int j = 0; j < 2; ++j) {
            // a[0]/a[2]: page g, a[1]/a[3]: page g + 8; words 2h (cols 2t, 2t+1) and 2h + 1.
#pragma unroll
            for (int i = 0; i < 2; ++i) {
              const uint32_t first = mma::word(data[i][0][c], 2 * h + j);
              const uint32_t second = mma::word(data[i][1][c], 2 * h + j);
              hi[2 * j + i] = mma::max_pair<T>(first, second);
              lo[2 * j + i] = mma::min_pair<T>(first, second);
            }
          }
          const uint32_t q_pos[2] = {mma::max_pair<T>(q_frag[2 * c + h][0], 0u),
                                     mma::max_pair<T>(q_frag[2 * c + h][1], 0u)};
          const uint32_t q_neg[2] = {mma::min_pair<T>(q_frag[2 * c + h][0], 0u),
                                     mma::min_pair<T>(q_frag[2 * c + h][1], 0u)};
          mma::mma_16816<T>(acc[0], hi, q_pos);
          mma::mma_16816<T>(acc[0], lo, q_neg);
        } else {
#pragma unroll
          for (int r = 0; r < kReps; ++r) {
            const uint32_t a[4] = {mma::word(data[0][r][c], 2 * h), mma::word(data[1][r][c], 2 * h),
                                   mma::word(data[0][r][c], 2 * h + 1),
                                   mma::word(data[1][r][c], 2 * h + 1)};
            mma::mma_16816<T>(acc[r], a, q_frag[2 * c + h]);
          }
        }
      }
    }

    // acc[.][0], [1]: page g, heads 2t, 2t + 1; acc[.][2], [3]: page g + 8, the same heads.
    float combined[2];
    bool has[2];
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      has[i] = false;
      combined[i] = 0.f;
#pragma unroll
      for (int j = 0; j < 2; ++j) {
        const int head = 2 * t + j;
        float s = acc[0][2 * i + j];
        if (!kBound && kReps == 2) s = fmax32(s, acc[kReps - 1][2 * i + j]);
        const bool valid = i == 0 ? valid_lo : valid_hi;
        if (head < group && valid && !isfinite(s))
          s = exact_head_score<T>(p, query + b * p.query_stride[0] +
                                          (kv * group + head) * p.query_stride[1],
                                  rows[i]);
        if (head < group) {
          combined[i] = group_combine(combined[i], s, !has[i], p.reduce);
          has[i] = true;
        }
      }
      // The quad's lanes hold heads 2t, 2t + 1 of the same page.
#pragma unroll
      for (int off = 1; off < 4; off *= 2) {
        const float other = __shfl_xor_sync(0xffffffffu, combined[i], off);
        const bool other_has = __shfl_xor_sync(0xffffffffu, static_cast<int>(has[i]), off) != 0;
        if (other_has) combined[i] = group_combine(combined[i], other, !has[i], p.reduce);
        has[i] = has[i] || other_has;
      }
    }
    if (t == 0) {
      if (valid_lo) p.scores[row * p.pages + page_lo] = combined[0];
      if (valid_hi) p.scores[row * p.pages + page_hi] = combined[1];
    }
  }
}

// Grid: x = blocks of one row (grid-stride over the row's tiles), y = (b, kv) rows.
// `done` counts finished blocks per row (zeroed by the caller) when the selection is fused, else
// nullptr.
template <typename T, int D, int kReps, bool kBound>
__global__ void __launch_bounds__(relevancy_tc::kThreads, 2)
    relevancy_tc_kernel(RelevancyParams p, SelectParams sp, int* done) {
  static_assert(relevancy_tc::kThreads == select_detail::kSmallThreads, "the last block selects its row");
  score_row_tiles_tc<T, D, kReps, kBound>(p, blockIdx.y, blockIdx.x, gridDim.x);
  if (done != nullptr) select_if_last_block<relevancy_tc::kThreads>(sp, blockIdx.y, done);
}

// DeepSeek's lightning indexer on tensor cores: score = sum_h w_h relu(q_h . key) over up to 64
// index heads, as up to eight n-tiles of 8 heads per 16-token tile. The heads' B fragments sit in
// shared memory (16 KB for 64 heads of D 128), laid out per lane so each is one 8-byte load.
// Non-finite scores are redone with the scalar formula (score_indexer), as for bound.
template <typename T, int D>
__global__ void __launch_bounds__(relevancy_tc::kThreads, 2)
    indexer_tc_kernel(RelevancyParams p, SelectParams sp, int* done) {
  using namespace relevancy_tc;
  static_assert(D % 32 == 0 && D <= 128, "D: 32-element chunks, registers for D <= 128");
  constexpr int kChunks = D / 32, kSteps = D / 16, kMaxTiles = kMaxIndexHeads / 8;
  __shared__ uint2 q_frags[kMaxTiles][kSteps][32];
  __shared__ float head_weights[kMaxIndexHeads];

  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int g = lane / 4, t = lane % 4;
  const int64_t row = blockIdx.y, b = row / p.kv_heads, kv = row % p.kv_heads;
  const int group = static_cast<int>(p.q_heads / p.kv_heads);
  const int n_tiles = (group + 7) / 8;
  const T* q_first = static_cast<const T*>(p.query) + b * p.query_stride[0] +
                     kv * group * p.query_stride[1];
  const float* w_first = p.weights + b * p.q_heads + kv * group;
  // Fragment (n-tile nt, k-step s, lane l): head 8 nt + l / 4, elements 32c + 8(l % 4) + 4h + 0..3
  // with s = 2c + h, the element order of the A fragments below.
  for (int i = threadIdx.x; i < n_tiles * kSteps * 32; i += kThreads) {
    const int nt = i / (kSteps * 32), step = (i / 32) % kSteps, l = i % 32;
    const int head = 8 * nt + l / 4;
    const int element = 32 * (step / 2) + 8 * (l % 4) + 4 * (step % 2);
    q_frags[nt][step][l] = head < group ? *reinterpret_cast<const uint2*>(
                                              q_first + head * p.query_stride[1] + element)
                                        : make_uint2(0, 0);
  }
  for (int h = threadIdx.x; h < kMaxIndexHeads; h += kThreads)
    head_weights[h] = h < group ? w_first[h] : 0.f;
  __syncthreads();

  const T* summary = static_cast<const T*>(p.summary) + b * p.summary_stride[0] +
                     kv * p.summary_stride[1];
  const int64_t limit = relevancy_detail::valid_pages(p.num_pages, b, p.pages);
  const int64_t tiles = ceil_div(limit, kTilePages);
  for (int64_t tile = int64_t(blockIdx.x) * kWarps + warp; tile < tiles;
       tile += int64_t(gridDim.x) * kWarps) {
    const int64_t page_lo = tile * kTilePages + g, page_hi = page_lo + 8;
    const bool valid_lo = page_lo < limit, valid_hi = page_hi < limit;
    const T* rows[2] = {summary + page_lo * p.summary_stride[2],
                        summary + page_hi * p.summary_stride[2]};
    uint4 key_lo[kChunks], key_hi[kChunks];
#pragma unroll
    for (int c = 0; c < kChunks; ++c) {
      key_lo[c] = valid_lo ? mma::load16(rows[0] + 32 * c + 8 * t) : make_uint4(0, 0, 0, 0);
      key_hi[c] = valid_hi ? mma::load16(rows[1] + 32 * c + 8 * t) : make_uint4(0, 0, 0, 0);
    }
    float score[2] = {0.f, 0.f};
    for (int nt = 0; nt < n_tiles; ++nt) {
      float acc[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
      for (int c = 0; c < kChunks; ++c) {
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const uint32_t a[4] = {mma::word(key_lo[c], 2 * h), mma::word(key_hi[c], 2 * h),
                                 mma::word(key_lo[c], 2 * h + 1), mma::word(key_hi[c], 2 * h + 1)};
          const uint2 q = q_frags[nt][2 * c + h][lane];
          const uint32_t bq[2] = {q.x, q.y};
          mma::mma_16816<T>(acc, a, bq);
        }
      }
      // acc[0], [1]: token g, heads 8 nt + 2t, + 1; acc[2], [3]: token g + 8. A non-finite
      // logit keeps its token's score non-finite, so that the token is redone below.
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const float w = head_weights[8 * nt + 2 * t + (i & 1)];
        const float logit = acc[i];
        score[i / 2] += isfinite(logit) ? w * relu32(logit) : NAN;
      }
    }
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      score[i] += __shfl_xor_sync(0xffffffffu, score[i], 1);
      score[i] += __shfl_xor_sync(0xffffffffu, score[i], 2);
    }
    if (t == 0) {
#pragma unroll
      for (int i = 0; i < 2; ++i) {
        if (!(i == 0 ? valid_lo : valid_hi)) continue;
        float s = score[i];
        if (!isfinite(s))
          s = score_indexer(q_first, p.query_stride[1], group, w_first, rows[i], p.dim);
        p.scores[row * p.pages + (i == 0 ? page_lo : page_hi)] = s;
      }
    }
  }
  if (done != nullptr) select_if_last_block<kThreads>(sp, row, done);
}

template <typename T, int D, int kReps, bool kBound>
gpu::Error launch_relevancy_tc_for(const RelevancyParams& p, const SelectParams& sp, int* done,
                                   int resident_blocks, gpu::Stream stream) {
  using namespace relevancy_tc;
  const int64_t rows = p.batch * p.kv_heads;
  const int64_t tiles = ceil_div(p.pages, kTilePages);
  // As many blocks as fit at once, spread over the rows (no tail wave), at least one per row.
  const int64_t blocks_x =
      max64(1, min64(ceil_div(tiles, kWarps), resident_blocks / max64(rows, 1)));
  const dim3 grid(static_cast<unsigned>(blocks_x), static_cast<unsigned>(rows));
  relevancy_tc_kernel<T, D, kReps, kBound><<<grid, kThreads, 0, stream>>>(p, sp, done);
  return gpu::last_error();
}

// Scores (and, with `done`, selects) with the tensor-core kernel; `done`: rows zeroed ints, or
// nullptr to leave the selection to launch_select_topk.
template <typename T>
gpu::Error launch_relevancy_tc(const RelevancyParams& p, const SelectParams& sp, int* done,
                               int resident_blocks, gpu::Stream stream) {
  if (p.batch * p.kv_heads == 0) return gpu::kSuccess;
  if (p.mode == RelevancyMode::kIndexer) {
    const int64_t rows = p.batch * p.kv_heads;
    const int64_t blocks_x = max64(1, min64(ceil_div(ceil_div(p.pages, relevancy_tc::kTilePages),
                                                     relevancy_tc::kWarps),
                                            resident_blocks / rows));
    const dim3 grid(static_cast<unsigned>(blocks_x), static_cast<unsigned>(rows));
    if (p.dim == 64)
      indexer_tc_kernel<T, 64><<<grid, relevancy_tc::kThreads, 0, stream>>>(p, sp, done);
    else
      indexer_tc_kernel<T, 128><<<grid, relevancy_tc::kThreads, 0, stream>>>(p, sp, done);
    return gpu::last_error();
  }
  const bool bound = p.mode == RelevancyMode::kBound;
  if (p.dim == 64) {
    if (bound) return launch_relevancy_tc_for<T, 64, 2, true>(p, sp, done, resident_blocks, stream);
    if (p.reps == 1)
      return launch_relevancy_tc_for<T, 64, 1, false>(p, sp, done, resident_blocks, stream);
    return launch_relevancy_tc_for<T, 64, 2, false>(p, sp, done, resident_blocks, stream);
  }
  if (bound) return launch_relevancy_tc_for<T, 128, 2, true>(p, sp, done, resident_blocks, stream);
  if (p.reps == 1)
    return launch_relevancy_tc_for<T, 128, 1, false>(p, sp, done, resident_blocks, stream);
  return launch_relevancy_tc_for<T, 128, 2, false>(p, sp, done, resident_blocks, stream);
}

}  // namespace memops
