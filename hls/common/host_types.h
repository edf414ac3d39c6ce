// Host stand-ins for the two vendor types the memops kernels use, for builds without
// ap_int.h / hls_stream.h: a 512-bit word with 16/32-bit lane access (little-endian, laid out in
// memory exactly like ap_uint<512>) and an unbounded FIFO with hls::stream's read/write/empty.
// C-simulation of the kernels always uses the vendor headers; these only keep the extension's
// emulation buildable everywhere.
#pragma once

#include <cstdint>
#include <cstring>
#include <deque>
#include <stdexcept>

namespace memops_hls {

struct host_word512 {
  uint32_t lanes32[16];

  void clear() { std::memset(lanes32, 0, sizeof(lanes32)); }
  uint32_t get32(int lane) const { return lanes32[lane]; }
  void set32(int lane, uint32_t v) { lanes32[lane] = v; }
  uint16_t get16(int lane) const {
    uint16_t v;
    std::memcpy(&v, reinterpret_cast<const char*>(lanes32) + 2 * lane, 2);
    return v;
  }
  void set16(int lane, uint16_t v) {
    std::memcpy(reinterpret_cast<char*>(lanes32) + 2 * lane, &v, 2);
  }
  uint8_t get8(int lane) const { return reinterpret_cast<const uint8_t*>(lanes32)[lane]; }
  void set8(int lane, uint8_t v) { reinterpret_cast<uint8_t*>(lanes32)[lane] = v; }
};

}  // namespace memops_hls

namespace hls {

template <typename T>
class stream {
 public:
  stream() = default;
  explicit stream(const char*) {}
  stream(const stream&) = delete;
  stream& operator=(const stream&) = delete;

  void write(const T& v) { fifo_.push_back(v); }
  T read() {
    if (fifo_.empty()) throw std::runtime_error("hls::stream read from an empty stream");
    T v = fifo_.front();
    fifo_.pop_front();
    return v;
  }
  bool empty() const { return fifo_.empty(); }
  size_t size() const { return fifo_.size(); }

 private:
  std::deque<T> fifo_;
};

}  // namespace hls
