// Golden-vector I/O shared by the C-simulation testbenches (see hls/golden.py for the format).
#pragma once

#include <cstdint>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <iterator>
#include <map>
#include <stdexcept>
#include <string>
#include <vector>

#include "memops_hls.h"

namespace memops_tb {

using Params = std::map<std::string, int64_t>;

inline Params read_params(const std::string& dir) {
  std::ifstream in(dir + "/params.txt");
  if (!in) throw std::runtime_error("cannot read " + dir + "/params.txt");
  Params p;
  std::string key;
  int64_t value;
  while (in >> key >> value) p[key] = value;
  return p;
}

inline std::vector<char> read_bytes(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw std::runtime_error("cannot read " + path);
  return std::vector<char>(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
}

inline std::vector<std::string> read_cases(const std::string& dir) {
  std::ifstream in(dir + "/cases.txt");
  if (!in) throw std::runtime_error("cannot read " + dir + "/cases.txt");
  std::vector<std::string> names;
  std::string name;
  while (in >> name) names.push_back(name);
  return names;
}

// Bytes -> 512-bit words, zero-padded to a whole word (the HBM buffer the kernel reads).
inline std::vector<memops_hls::word_t> to_words(const std::vector<char>& bytes) {
  std::vector<memops_hls::word_t> words((bytes.size() + 63) / 64, memops_hls::zero_word());
  std::memcpy(static_cast<void*>(words.data()), bytes.data(), bytes.size());
  return words;
}

template <typename T>
std::vector<T> to_vector(const std::vector<char>& bytes) {
  std::vector<T> v(bytes.size() / sizeof(T));
  std::memcpy(v.data(), bytes.data(), v.size() * sizeof(T));
  return v;
}

// Number of bytes that differ between `actual` and `expected`; prints the first few.
inline int64_t count_byte_errors(const std::string& what, const void* actual,
                                 const std::vector<char>& expected, size_t elem_bytes) {
  int64_t errors = 0;
  const char* a = static_cast<const char*>(actual);
  for (size_t i = 0; i < expected.size(); i += elem_bytes) {
    if (std::memcmp(a + i, expected.data() + i, elem_bytes) != 0) {
      if (errors < 5) std::printf("  %s: element %zu differs\n", what.c_str(), i / elem_bytes);
      ++errors;
    }
  }
  return errors;
}

// The testbench's main: `check_case(name, dir)` returns the error count of one golden case; every
// case of argv[1] runs. The exit status is the total error count (capped at 255, the largest
// exit status).
template <typename CheckCase>
int run_cases(int argc, char** argv, CheckCase check_case) {
  if (argc != 2) {
    std::fprintf(stderr, "usage: %s GOLDEN_DIR/<kernel>\n", argv[0]);
    return 255;
  }
  int64_t errors = 0;
  for (const std::string& name : read_cases(argv[1])) {
    const int64_t case_errors = check_case(name, std::string(argv[1]) + "/" + name);
    std::printf("%s: %lld errors\n", name.c_str(), static_cast<long long>(case_errors));
    errors += case_errors;
  }
  std::printf("errors: %lld\n", static_cast<long long>(errors));
  return static_cast<int>(errors < 255 ? errors : 255);
}

}  // namespace memops_tb
