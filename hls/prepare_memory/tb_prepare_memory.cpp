// C-simulation testbench of memops_prepare_memory: every golden case, every byte compared.
// Usage: tb_prepare_memory GOLDEN_DIR/prepare_memory; prints and returns the error count.
#include "prepare_memory.h"
#include "tb_io.h"

int main(int argc, char** argv) {
  using namespace memops_tb;
  return run_cases(argc, argv, [](const std::string& name, const std::string& dir) -> int64_t {
    Params p = read_params(dir);
    const int64_t elem = p["dtype"] == memops_hls::kFloat32 ? 4 : 2;
    const int64_t row_words = p["dim"] * elem / 64;
    auto keys = to_words(read_bytes(dir + "/keys.bin"));
    auto summary = to_words(read_bytes(dir + "/summary.bin"));
    const auto lens = to_vector<int32_t>(read_bytes(dir + "/seq_lens.bin"));
    const auto expected = read_bytes(dir + "/expected.bin");
    const int64_t H = p["heads"], N = p["pages"], R = p["reps"];
    // mode 2 (minmax_int8): codes, D / 64 words a row, and float32 scales compared byte for byte.
    const bool int8 = p["mode"] == 2;
    const int64_t out_words = int8 ? p["dim"] / 64 : row_words;
    std::vector<float> scales(int8 ? p["batch"] * H * N : 1, -12345.f);
    memops_prepare_memory(keys.data(), summary.data(), lens.data(), 0, 0, 0, p["batch"], H,
                          row_words, p["page_size"], p["first_page"], N,
                          H * p["buffer_tokens"] * row_words, p["buffer_tokens"] * row_words,
                          row_words, H * N * R * out_words, N * R * out_words, R * out_words,
                          out_words, p["mode"], p["dtype"], scales.data(), 0, H * N, N, 1);
    int64_t errors = count_byte_errors(name, summary.data(), expected, int8 ? 1 : elem);
    if (int8)
      errors += count_byte_errors(name + " scales", scales.data(),
                                  read_bytes(dir + "/expected_scales.bin"), 4);
    return errors;
  });
}
