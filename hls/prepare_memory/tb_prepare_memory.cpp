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
    memops_prepare_memory(keys.data(), summary.data(), lens.data(), 0, 0, 0, p["batch"], H,
                          row_words, p["page_size"], p["first_page"], N,
                          H * p["buffer_tokens"] * row_words, p["buffer_tokens"] * row_words,
                          row_words, H * N * R * row_words, N * R * row_words, R * row_words,
                          row_words, p["mode"], p["dtype"]);
    return count_byte_errors(name, summary.data(), expected, elem);
  });
}
