// C-simulation testbench of memops_topk_relevancy: every golden case; indices compared exactly,
// scores bit for bit (the golden inputs make every score exact, see hls/golden.py).
// Usage: tb_topk_relevancy GOLDEN_DIR/topk_relevancy; prints and returns the error count.
#include <cmath>

#include "tb_io.h"
#include "topk_relevancy.h"

int main(int argc, char** argv) {
  using namespace memops_tb;
  return run_cases(argc, argv, [](const std::string& name, const std::string& dir) -> int64_t {
    Params p = read_params(dir);
    const int64_t elem = p["dtype"] == memops_hls::kFloat32 ? 4 : 2;
    const int64_t row_words = p["dim"] * elem / 64;
    const int64_t B = p["batch"], Hq = p["q_heads"], Hkv = p["kv_heads"], N = p["pages"];
    const int64_t R = p["reps"], k = p["k"];
    auto query = to_words(read_bytes(dir + "/query.bin"));
    auto summary = to_words(read_bytes(dir + "/summary.bin"));
    // int8 cases: codes in summary.bin, D / 64 words a row, and float32 page scales.
    const bool int8 = p.count("summary_dtype") && p["summary_dtype"] == memops_hls::kInt8;
    const int64_t summary_words = int8 ? p["dim"] / 64 : row_words;
    const auto scales = int8 ? to_vector<float>(read_bytes(dir + "/scales.bin"))
                             : std::vector<float>(1, 0.f);
    const auto pages = to_vector<int32_t>(read_bytes(dir + "/num_pages.bin"));
    const auto weights = to_vector<float>(read_bytes(dir + "/weights.bin"));
    const auto expected_scores = to_vector<float>(read_bytes(dir + "/expected_scores.bin"));
    const auto expected_indices = to_vector<int32_t>(read_bytes(dir + "/expected_indices.bin"));
    // Poisoned outputs: a slot the kernel does not write shows up as an error.
    std::vector<float> scores(B * Hkv * k, 777.f);
    std::vector<int32_t> indices(B * Hkv * k, 777);
    memops_topk_relevancy(query.data(), summary.data(), pages.data(), weights.data(),
                          scores.data(), indices.data(), 0, 0, 0, 0, 0, 0, B, Hq, Hkv, R,
                          row_words, k, p["sink_pages"], p["recent_pages"], Hq * row_words,
                          row_words, Hkv * N * R * summary_words, N * R * summary_words,
                          R * summary_words, summary_words, p["mode"], p["group_reduce"],
                          p["dtype"], scales.data(), 0, Hkv * N, N, 1,
                          int8 ? memops_hls::kInt8 : p["dtype"]);
    int64_t case_errors = 0;
    for (size_t i = 0; i < indices.size(); ++i) {
      const bool same_score =
          std::memcmp(&scores[i], &expected_scores[i], sizeof(float)) == 0 ||
          (std::isnan(scores[i]) && std::isnan(expected_scores[i]));
      if (indices[i] != expected_indices[i] || !same_score) {
        if (case_errors < 5)
          std::printf("  slot %zu: got (%d, %g), expected (%d, %g)\n", i, indices[i], scores[i],
                      expected_indices[i], expected_scores[i]);
        ++case_errors;
      }
    }
    return case_errors;
  });
}
