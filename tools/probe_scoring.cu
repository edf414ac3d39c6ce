// Times the tensor-core bound scoring kernel (relevancy_tc_kernel) and the row selection on one
// GPU, with no torch: blocks per row, the selection fused or as a kernel of its own after the
// scoring, the selection alone with cold and warm caches, an empty launch for scale.
// tools/gpu_probe.sh builds it twice (this tree's headers, and older ones) to compare two
// versions in one run. An experiment tool (the ops are measured in
// benchmarks/); every variant's scores are checked bit-equal to the default kernel's.
//   nvcc -std=c++20 -O3 -arch=sm_90 --expt-relaxed-constexpr -Icsrc/include tools/probe_scoring.cu
//   ./a.out [shape [variant]]   one line per (shape, variant) whose names contain the arguments:
//                               median us, GB/s, % of the copy peak
#include <algorithm>
#include <cstdio>
#include <cstring>
#include <vector>

#include "memops/topk_relevancy_tc.cuh"

using namespace memops;
using T = __nv_bfloat16;
constexpr int D = 128;

#define CHECK(x)                                                                   \
  do {                                                                             \
    cudaError_t e_ = (x);                                                          \
    if (e_ != cudaSuccess) {                                                       \
      std::printf("CUDA error %s at %s:%d\n", cudaGetErrorString(e_), __FILE__, __LINE__); \
      std::exit(1);                                                                \
    }                                                                              \
  } while (0)

__global__ void fill_random(T* out, int64_t n, uint32_t seed, float scale) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n;
       i += int64_t(gridDim.x) * blockDim.x) {
    uint32_t h = uint32_t(i) * 2654435761u ^ seed;
    h ^= h >> 15; h *= 2246822519u; h ^= h >> 13; h *= 3266489917u; h ^= h >> 16;
    out[i] = __float2bfloat16(scale * (float(h) / 4294967296.f - 0.5f));
  }
}

__global__ void empty_kernel() {}

struct Shape {
  const char* name;
  int64_t batch, q_heads, kv_heads, pages, k;
};

using Kernel = void (*)(RelevancyParams, SelectParams, int*);

struct Variant {
  const char* name;
  Kernel kernel;
  int blocks_factor;  // blocks per row = default * factor (capped at one tile per warp)
  int selection;  // 0 none, 1 fused into the scoring kernel, 2 the selection kernel after it
};

const Kernel kScoring = &relevancy_tc_kernel<T, D, 2, true>;

float median(std::vector<float> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

int main(int argc, char** argv) {
  const char* only_shape = argc > 1 ? argv[1] : "";
  const char* only_variant = argc > 2 ? argv[2] : "";
  cudaDeviceProp prop;
  CHECK(cudaGetDeviceProperties(&prop, 0));
  const int resident = 2 * prop.multiProcessorCount;
  std::printf("device %s, %d SMs, L2 %d MB\n", prop.name, prop.multiProcessorCount,
              prop.l2CacheSize >> 20);

  const size_t flush_bytes = size_t(512) << 20;
  char* flush;
  CHECK(cudaMalloc(&flush, flush_bytes));
  cudaEvent_t start, stop;
  CHECK(cudaEventCreate(&start));
  CHECK(cudaEventCreate(&stop));

  // Copy peak: a 2 GiB device-to-device copy, bytes read + written.
  const size_t copy_bytes = size_t(1) << 30;
  char *src, *dst;
  CHECK(cudaMalloc(&src, copy_bytes));
  CHECK(cudaMalloc(&dst, copy_bytes));
  std::vector<float> copy_ms;
  for (int i = 0; i < 12; ++i) {
    CHECK(cudaEventRecord(start));
    CHECK(cudaMemcpyAsync(dst, src, copy_bytes, cudaMemcpyDeviceToDevice));
    CHECK(cudaEventRecord(stop));
    CHECK(cudaEventSynchronize(stop));
    float ms;
    CHECK(cudaEventElapsedTime(&ms, start, stop));
    if (i >= 2) copy_ms.push_back(ms);
  }
  const double peak = 2.0 * copy_bytes / (median(copy_ms) * 1e-3) / 1e9;
  std::printf("copy peak %.0f GB/s\n", peak);
  CHECK(cudaFree(src));
  CHECK(cudaFree(dst));

  const Shape shapes[] = {
      {"L3 B8 32K", 8, 32, 8, 2048, 128},   {"L3 B1 32K", 1, 32, 8, 2048, 128},
      {"L3 B8 128K", 8, 32, 8, 8192, 256},  {"L3 B1 128K", 1, 32, 8, 8192, 256},
      {"Qwen B8 32K", 8, 28, 4, 2048, 128}, {"MHA B8 32K", 8, 32, 32, 2048, 128},
      // Rows just past 2048 pages (a static cache of 32K + the new tokens) and up to twice that:
      // the fused selection's 12 and 16 keys a thread against the 1024-thread kernel.
      {"L3 B8 32K+2", 8, 32, 8, 2050, 128},  {"L3 B1 32K+2", 1, 32, 8, 2050, 128},
      {"L3 B8 48K", 8, 32, 8, 3072, 192},    {"L3 B1 48K", 1, 32, 8, 3072, 192},
      {"L3 B8 64K", 8, 32, 8, 4096, 256},    {"L3 B1 64K", 1, 32, 8, 4096, 256},
  };
  const Variant variants[] = {
      {"default", kScoring, 1, 0},
      {"blocks x2", kScoring, 2, 0},
      {"blocks x4", kScoring, 4, 0},
      {"fused selection", kScoring, 1, 1},
      {"then the selection kernel", kScoring, 1, 2},
  };

  for (const Shape& s : shapes) {
    if (!std::strstr(s.name, only_shape)) continue;
    const int64_t rows = s.batch * s.kv_heads;
    const int64_t summary_elems = rows * s.pages * 2 * D;
    const int64_t query_elems = s.batch * s.q_heads * D;
    T *summary, *query;
    float *scores, *reference, *top_scores;
    int32_t* top_indices;
    int* done;
    CHECK(cudaMalloc(&summary, summary_elems * sizeof(T)));
    CHECK(cudaMalloc(&query, query_elems * sizeof(T)));
    CHECK(cudaMalloc(&scores, rows * s.pages * sizeof(float)));
    CHECK(cudaMalloc(&reference, rows * s.pages * sizeof(float)));
    CHECK(cudaMalloc(&top_scores, rows * s.k * sizeof(float)));
    CHECK(cudaMalloc(&top_indices, rows * s.k * sizeof(int32_t)));
    CHECK(cudaMalloc(&done, rows * sizeof(int)));
    fill_random<<<1024, 256>>>(summary, summary_elems, 17, 4.f);
    fill_random<<<64, 256>>>(query, query_elems, 29, 2.f);

    RelevancyParams p{};
    p.query = query;
    p.summary = summary;
    p.scores = scores;
    p.batch = s.batch;
    p.q_heads = s.q_heads;
    p.kv_heads = s.kv_heads;
    p.pages = s.pages;
    p.reps = 2;
    p.dim = D;
    p.query_stride[0] = s.q_heads * D;
    p.query_stride[1] = D;
    p.summary_stride[0] = s.kv_heads * s.pages * 2 * D;
    p.summary_stride[1] = s.pages * 2 * D;
    p.summary_stride[2] = 2 * D;
    p.summary_stride[3] = D;
    p.mode = RelevancyMode::kBound;
    p.reduce = GroupReduce::kMax;
    SelectParams sp{};
    sp.scores = scores;
    sp.top_scores = top_scores;
    sp.top_indices = top_indices;
    sp.heads = s.kv_heads;
    sp.pages = s.pages;
    sp.k = s.k;
    sp.sink_pages = 1;
    sp.recent_pages = 2;

    const auto select_rows = [&] {
      if (s.pages <= 2048)
        select_topk_small_kernel<select_detail::kSmallThreads>
            <<<unsigned(rows), select_detail::kSmallThreads>>>(sp);
      else
        select_topk_small_kernel<select_detail::kLargeThreads>
            <<<unsigned(rows), select_detail::kLargeThreads>>>(sp);
    };
    const int64_t tiles = ceil_div(s.pages, relevancy_tc::kTilePages);
    const int64_t max_blocks = ceil_div(tiles, relevancy_tc::kWarps);
    const int64_t default_blocks = std::max<int64_t>(1, std::min<int64_t>(max_blocks, resident / rows));
    const double bytes = double(summary_elems) * sizeof(T);
    std::printf("\n%s: %lld rows x %lld pages, %.1f MB of summary, floor %.1f us\n", s.name,
                (long long)rows, (long long)s.pages, bytes / 1e6, bytes / peak / 1e3);

    for (const Variant& v : variants) {
      if (v.selection == 1 && s.pages > select_detail::kSmallMaxPages) continue;
      if (&v != &variants[0] && !std::strstr(v.name, only_variant)) continue;
      const int64_t blocks_x = std::min<int64_t>(max_blocks, default_blocks * v.blocks_factor);
      const dim3 grid{unsigned(blocks_x), unsigned(rows)};
      std::vector<float> times;
      for (int i = 0; i < 40; ++i) {
        CHECK(cudaMemsetAsync(flush, i & 0xff, flush_bytes));
        if (v.selection == 1) CHECK(cudaMemsetAsync(done, 0, rows * sizeof(int)));
        CHECK(cudaEventRecord(start));
        v.kernel<<<grid, relevancy_tc::kThreads>>>(p, sp, v.selection == 1 ? done : nullptr);
        if (v.selection == 2) select_rows();
        CHECK(cudaEventRecord(stop));
        CHECK(cudaEventSynchronize(stop));
        CHECK(cudaGetLastError());
        float ms;
        CHECK(cudaEventElapsedTime(&ms, start, stop));
        if (i >= 5) times.push_back(ms);
      }
      const float us = median(times) * 1e3f;
      bool same = true;
      if (&v == &variants[0]) {
        CHECK(cudaMemcpy(reference, scores, rows * s.pages * sizeof(float), cudaMemcpyDeviceToDevice));
      } else {
        std::vector<float> a(rows * s.pages), r(rows * s.pages);
        CHECK(cudaMemcpy(a.data(), scores, a.size() * sizeof(float), cudaMemcpyDeviceToHost));
        CHECK(cudaMemcpy(r.data(), reference, r.size() * sizeof(float), cudaMemcpyDeviceToHost));
        same = std::memcmp(a.data(), r.data(), a.size() * sizeof(float)) == 0;
      }
      std::printf("  %-32s %5lld blocks/row %8.2f us %7.0f GB/s %5.1f %% %s\n", v.name,
                  (long long)blocks_x, us, bytes / (us * 1e-6) / 1e9,
                  100.0 * bytes / (us * 1e-6) / 1e9 / peak, same ? "" : "SCORES DIFFER");
    }

    // The selection alone on the scores above: a launch of its own per row (256 threads up to
    // 2048 pages, else 1024, as launch_select_topk), cold (L2 overwritten) and warm (launched
    // again right after itself).
    {
      const auto select = [&] { select_rows(); };
      const char* states[] = {"cold", "warm"};
      for (int state = 0; state < 2; ++state) {
        std::vector<float> times;
        for (int i = 0; i < 40; ++i) {
          if (state == 0) CHECK(cudaMemsetAsync(flush, i & 0xff, flush_bytes));
          if (state == 1) select();
          CHECK(cudaEventRecord(start));
          select();
          CHECK(cudaEventRecord(stop));
          CHECK(cudaEventSynchronize(stop));
          float ms;
          CHECK(cudaEventElapsedTime(&ms, start, stop));
          if (i >= 5) times.push_back(ms);
        }
        std::printf("  %-32s %8.2f us (%s)\n", "selection kernel alone", median(times) * 1e3f,
                    states[state]);
      }
      {
        std::vector<float> times;
        for (int i = 0; i < 40; ++i) {
          CHECK(cudaEventRecord(start));
          empty_kernel<<<unsigned(rows), select_detail::kSmallThreads>>>();
          CHECK(cudaEventRecord(stop));
          CHECK(cudaEventSynchronize(stop));
          float ms;
          CHECK(cudaEventElapsedTime(&ms, start, stop));
          if (i >= 5) times.push_back(ms);
        }
        std::printf("  %-32s %8.2f us\n", "empty kernel, same grid", median(times) * 1e3f);
      }
      // A checksum of each row's chosen set, so that builds with other selections can be compared.
      std::vector<int32_t> idx(rows * s.k);
      CHECK(cudaMemcpy(idx.data(), top_indices, idx.size() * sizeof(int32_t), cudaMemcpyDeviceToHost));
      uint64_t sum = 0;
      for (int64_t r = 0; r < rows; ++r) {
        std::sort(idx.begin() + r * s.k, idx.begin() + (r + 1) * s.k);
        for (int64_t j = 0; j < s.k; ++j) sum = sum * 1000003u + uint64_t(idx[r * s.k + j] + 1);
      }
      std::printf("  %-32s %016llx\n", "chosen-set checksum", (unsigned long long)sum);
    }
    CHECK(cudaFree(summary));
    CHECK(cudaFree(query));
    CHECK(cudaFree(scores));
    CHECK(cudaFree(reference));
    CHECK(cudaFree(top_scores));
    CHECK(cudaFree(top_indices));
    CHECK(cudaFree(done));
  }
  return 0;
}
