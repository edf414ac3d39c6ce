// C-simulation testbench of memops_gather_retrieve: every golden case, every byte of `out` and
// every length compared. Usage: tb_gather_retrieve GOLDEN_DIR/gather_retrieve; prints and
// returns the error count.
#include "gather_retrieve.h"
#include "tb_io.h"

int main(int argc, char** argv) {
  using namespace memops_tb;
  return run_cases(argc, argv, [](const std::string& name, const std::string& dir) -> int64_t {
    Params p = read_params(dir);
    const int64_t row_words = p["dim"] * p["elem_bytes"] / 64;
    const int64_t B = p["batch"], H = p["heads"], k = p["k"], P = p["page_size"];
    auto memory = to_words(read_bytes(dir + "/memory.bin"));
    const auto indices = to_vector<int32_t>(read_bytes(dir + "/indices.bin"));
    const auto lens = to_vector<int32_t>(read_bytes(dir + "/seq_lens.bin"));
    const auto expected_out = read_bytes(dir + "/expected_out.bin");
    const auto expected_lengths = read_bytes(dir + "/expected_lengths.bin");
    // Poisoned outputs: bytes the kernel does not write show up as errors.
    std::vector<memops_hls::word_t> out(B * H * k * P * row_words);
    std::memset(static_cast<void*>(out.data()), 0x5A, out.size() * 64);
    std::vector<int32_t> lengths(B * H, -7);
    memops_gather_retrieve(memory.data(), indices.data(), lens.data(), out.data(),
                           lengths.data(), 0, 0, 0, 0, 0, B, H, row_words, k, P,
                           H * p["buffer_tokens"] * row_words, p["buffer_tokens"] * row_words,
                           row_words, H * k, k, 1);
    return count_byte_errors(name + " out", out.data(), expected_out, p["elem_bytes"]) +
        count_byte_errors(name + " lengths", lengths.data(), expected_lengths, 4);
  });
}
