// memops operators on the fpga device: each launches its HLS kernel through the runtime (native
// XRT: the xclbin's compute unit; emulation: the same top function compiled for the host) on the
// device copies of the buffer objects. Plus the memops_fpga library that torch_memops.fpga uses.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <string>
#include <vector>

#include "fpga/fpga_tensor.h"
#include "memops_hls.h"
#include "validate.h"

namespace memops::fpga {
namespace {

using memops_hls::kWordBytes;

// Kernel arguments of one launch. Tensors without storage bytes (an empty summary, say) get a
// scratch buffer object: every m_axi port needs one, and the kernel reads nothing from it.
class Launch {
 public:
  explicit Launch(std::string name) : name_(std::move(name)) {}

  void buffer(const at::Tensor& t) {
    BufferObject* bo = buffer_of(t);
    if (bo == nullptr) {
      scratch_.push_back(at::empty({kWordBytes}, t.options().dtype(at::kByte)));
      bo = buffer_of(scratch_.back());
    }
    args_.push_back(KernelArg::of(bo));
  }
  void scalar(int64_t v) { args_.push_back(KernelArg::of(v)); }
  void run() {
    try {
      fpga_runtime().run(name_, args_);
    } catch (const c10::Error&) {
      throw;
    } catch (const std::exception& e) {
      TORCH_CHECK(false, "fpga: kernel ", name_, " failed: ", e.what());
    }
  }

 private:
  std::string name_;
  std::vector<KernelArg> args_;
  std::vector<at::Tensor> scratch_;
};

int64_t dtype_code(const char* op, const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return memops_hls::kFloat32;
    case at::kHalf: return memops_hls::kFloat16;
    case at::kBFloat16: return memops_hls::kBFloat16;
    default: TORCH_CHECK(false, "memops.", op, ": unsupported dtype ", t.scalar_type());
  }
}

// The kernels move whole 512-bit words: a token row (the last dim) must be a whole number of
// words, and so must every stride and the tensor's offset in its buffer object. That is an
// internal detail: a tensor laid out otherwise (D = 24 in bfloat16, a view of a buffer whose
// rows are 48 bytes, ...) is copied on the device into a zero-padded buffer whose rows are whole
// words (`word_padded`), the kernel runs on that, and outputs are cut back to D (`unpadded`).
// Zero padding changes no result bit: min, max and mean are per element, scores add +0 to sums
// that start at +0, and gathered padding columns are cut off.
bool has_word_layout(const at::Tensor& t) {
  const int64_t row_bytes = t.size(-1) * t.itemsize();
  if (row_bytes == 0 || row_bytes % kWordBytes != 0) return false;
  if (byte_offset(t) % kWordBytes != 0) return false;
  for (int64_t d = 0; d + 1 < t.dim(); ++d)
    if ((t.stride(d) * t.itemsize()) % kWordBytes != 0) return false;
  return true;
}

// D rounded up to whole words (at least one).
int64_t padded_dim(const at::Tensor& t) {
  const int64_t per_word = kWordBytes / static_cast<int64_t>(t.itemsize());
  return std::max<int64_t>(1, ceil_div(t.size(-1), per_word)) * per_word;
}

at::Tensor word_padded(const at::Tensor& t) {
  if (has_word_layout(t)) return t;
  std::vector<int64_t> sizes = t.sizes().vec();
  sizes.back() = padded_dim(t);
  at::Tensor padded = at::zeros(sizes, t.options());
  padded.narrow(-1, 0, t.size(-1)).copy_(t);
  return padded;
}

// An output computed in `padded` (rows of whole words), as a contiguous tensor of `dim` columns.
at::Tensor unpadded(const at::Tensor& padded, int64_t dim) {
  if (padded.size(-1) == dim) return padded;
  return padded.narrow(-1, 0, dim).contiguous();
}

// Kernels that compute on a row hold it in a buffer of kMaxHeadDim elements.
void check_row_buffer(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK_VALUE(t.size(-1) <= memops_hls::kMaxHeadDim, "memops.", op,
                    " on fpga: the last dim of `", name, "` must be <= ",
                    memops_hls::kMaxHeadDim, " (the kernels' row buffer), got ", t.size(-1));
}

int64_t words(const at::Tensor& t, int64_t elements) {
  return elements * static_cast<int64_t>(t.itemsize()) / kWordBytes;
}

int64_t word_offset(const at::Tensor& t) {
  return static_cast<int64_t>(byte_offset(t)) / kWordBytes;
}

int64_t element_offset(const at::Tensor& t) { return t.storage_offset(); }

// An int32 [B] vector on fpga: the one given (made contiguous) or `fill` everywhere.
at::Tensor int_vector_or(const std::optional<at::Tensor>& given, const at::Tensor& like,
                         int64_t batch, int64_t fill) {
  if (given.has_value()) return given->contiguous();
  return at::full({batch}, fill, like.options().dtype(at::kInt));
}

// The prepare kernel's mode code of minmax_int8 (hls/prepare_memory/prepare_memory.h).
constexpr int64_t kPrepareModeInt8 = 2;

// int8 summaries run on word-aligned layouts only (no padding path): the codes' rows, the keys'
// rows and every stride must be whole 512-bit words.
void check_word_layout(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK_VALUE(has_word_layout(t), "memops.", op, " on fpga: int8 summaries need `", name,
                    "` laid out in whole 64-byte words (its last dim, strides and offset), got D = ",
                    t.size(-1), " of ", t.scalar_type(), " with strides ", t.strides());
  check_row_buffer(op, name, t);
}

// One launch on word-aligned `keys` and `summary` (rows of at most kMaxHeadDim elements).
// `mode`: a SummaryMode or kPrepareModeInt8; `scales`: the page scales of an int8 summary.
void launch_prepare_memory(const at::Tensor& keys, const at::Tensor& summary, int64_t page_size,
                           int64_t first_page, int64_t mode, const at::Tensor& lens,
                           const at::Tensor& scales = at::Tensor()) {
  const int64_t B = keys.size(0), H = keys.size(1), S = keys.size(2);
  const int64_t last_page = ceil_div(S, page_size);
  const at::Tensor page_scales =
      scales.defined() ? scales : at::empty({0}, keys.options().dtype(at::kFloat));
  Launch launch("memops_prepare_memory");
  launch.buffer(keys);
  launch.buffer(summary);
  launch.buffer(lens);
  for (int64_t v : {word_offset(keys), word_offset(summary), element_offset(lens), B, H,
                    words(keys, keys.size(3)), page_size, first_page, last_page,
                    words(keys, keys.stride(0)), words(keys, keys.stride(1)),
                    words(keys, keys.stride(2)), words(summary, summary.stride(0)),
                    words(summary, summary.stride(1)), words(summary, summary.stride(2)),
                    words(summary, summary.stride(3)), mode,
                    dtype_code("prepare_memory", keys)})
    launch.scalar(v);
  launch.buffer(page_scales);
  for (int64_t v : {element_offset(page_scales),
                    scales.defined() ? scales.stride(0) : int64_t{0},
                    scales.defined() ? scales.stride(1) : int64_t{0},
                    scales.defined() ? scales.stride(2) : int64_t{0}})
    launch.scalar(v);
  launch.run();
}

// Summarises pages first_page .. ceil(S / P) - 1 of `keys` into `summary` (any D, any layout).
// Only those pages' tokens are padded (a decode step pads one page, not the cache), and a head
// dim wider than the row buffer runs in column chunks: min, max and mean are per element.
void prepare_pages(const at::Tensor& keys, at::Tensor& summary, int64_t page_size,
                   int64_t first_page, SummaryMode mode,
                   const std::optional<at::Tensor>& seq_lens) {
  const int64_t B = keys.size(0), H = keys.size(1), S = keys.size(2), D = keys.size(3);
  const int64_t last_page = ceil_div(S, page_size);
  if (first_page >= last_page || B * H == 0) return;
  const bool aligned = has_word_layout(keys) && has_word_layout(summary);
  at::Tensor k = keys, out = summary, lens = int_vector_or(seq_lens, keys, B, S);
  int64_t first = first_page;
  if (!aligned) {
    // Tokens from the first page on; lengths shifted with them (pages stay page-aligned).
    const int64_t first_token = first_page * page_size;
    k = word_padded(keys.narrow(2, first_token, S - first_token));
    out = at::zeros({B, H, last_page - first_page, summary.size(3), k.size(3)},
                    summary.options());
    lens = (lens.cpu() - first_token).clamp_min(0).to(at::kInt).to(keys.device());
    first = 0;
  }
  const int64_t chunk = memops_hls::kMaxHeadDim;
  for (int64_t c = 0; c < k.size(3); c += chunk) {
    const int64_t width = std::min(chunk, k.size(3) - c);
    launch_prepare_memory(k.narrow(3, c, width), out.narrow(4, c, width), page_size, first,
                          static_cast<int64_t>(mode), lens);
  }
  if (!aligned)
    summary.narrow(2, first_page, last_page - first_page).copy_(out.narrow(4, 0, D));
}

at::Tensor prepare_memory_fpga(const at::Tensor& keys, int64_t page_size, c10::string_view mode,
                               const std::optional<at::Tensor>& seq_lens) {
  const std::string mode_s(mode);
  check_prepare_memory(keys, page_size, mode_s, seq_lens);
  check_seq_lens_values("prepare_memory", seq_lens, keys.size(2));
  const SummaryMode m = parse_summary_mode("prepare_memory", mode_s);
  at::Tensor summary = new_summary(keys, page_size, m);
  prepare_pages(keys, summary, page_size, 0, m, seq_lens);
  return summary;
}

void prepare_memory_inplace_fpga(at::Tensor& summary, const at::Tensor& keys, int64_t page_size,
                                 int64_t first_page, c10::string_view mode,
                                 const std::optional<at::Tensor>& seq_lens) {
  const std::string mode_s(mode);
  check_prepare_memory_inplace(summary, keys, page_size, first_page, mode_s, seq_lens);
  check_seq_lens_values("prepare_memory_", seq_lens, keys.size(2));
  prepare_pages(keys, summary, page_size, first_page,
                parse_summary_mode("prepare_memory_", mode_s), seq_lens);
}

std::tuple<at::Tensor, at::Tensor> prepare_memory_int8_fpga(
    const at::Tensor& keys, int64_t page_size, const std::optional<at::Tensor>& seq_lens) {
  const char* op = "prepare_memory_int8";
  check_prepare_memory_int8(keys, page_size, seq_lens);
  check_word_layout(op, "keys", keys);
  check_seq_lens_values(op, seq_lens, keys.size(2));
  auto [codes, scales] = new_int8_summary(keys, page_size);
  check_word_layout(op, "summary", codes);
  const int64_t B = keys.size(0), S = keys.size(2);
  if (ceil_div(S, page_size) > 0 && B * keys.size(1) > 0)
    launch_prepare_memory(keys, codes, page_size, 0, kPrepareModeInt8,
                          int_vector_or(seq_lens, keys, B, S), scales);
  return {codes, scales};
}

void prepare_memory_int8_inplace_fpga(at::Tensor& codes, at::Tensor& scales,
                                      const at::Tensor& keys, int64_t page_size,
                                      int64_t first_page,
                                      const std::optional<at::Tensor>& seq_lens) {
  const char* op = "prepare_memory_int8_";
  check_prepare_memory_int8_inplace(codes, scales, keys, page_size, first_page, seq_lens);
  check_word_layout(op, "keys", keys);
  check_word_layout(op, "summary", codes);
  check_seq_lens_values(op, seq_lens, keys.size(2));
  const int64_t B = keys.size(0), S = keys.size(2);
  if (first_page < ceil_div(S, page_size) && B * keys.size(1) > 0)
    launch_prepare_memory(keys, codes, page_size, first_page, kPrepareModeInt8,
                          int_vector_or(seq_lens, keys, B, S), scales);
}

std::tuple<at::Tensor, at::Tensor> topk_relevancy_fpga(
    const at::Tensor& query, const at::Tensor& summary, int64_t k, c10::string_view mode,
    const std::optional<at::Tensor>& num_pages, int64_t sink_pages, int64_t recent_pages,
    c10::string_view group_reduce, const std::optional<at::Tensor>& weights,
    const std::optional<at::Tensor>& summary_scales) {
  const char* op = "topk_relevancy";
  const std::string mode_s(mode), reduce_s(group_reduce);
  check_topk_relevancy(query, summary, k, mode_s, num_pages, sink_pages, recent_pages, reduce_s,
                       weights, summary_scales);
  check_row_buffer(op, "query", query);
  const bool int8 = summary.scalar_type() == at::kChar;
  if (int8) {
    check_word_layout(op, "query", query);
    check_word_layout(op, "summary", summary);
  }
  check_num_pages_values(op, num_pages, summary.size(2));
  const int64_t B = summary.size(0), Hkv = summary.size(1), N = summary.size(2);
  const int64_t R = summary.size(3), Hq = query.size(1);
  TORCH_CHECK_VALUE(k <= memops_hls::kMaxTopK, "memops.", op, " on fpga: `k` must be <= ",
                    memops_hls::kMaxTopK, " (the kernel's top-k buffer), got ", k);
  TORCH_CHECK_VALUE(N <= memops_hls::kMaxPages, "memops.", op, " on fpga: at most ",
                    memops_hls::kMaxPages, " pages N (the kernel's score buffer), got ", N);
  TORCH_CHECK_VALUE(R <= memops_hls::kMaxReps, "memops.", op, " on fpga: at most ",
                    memops_hls::kMaxReps, " representatives R per page, got ", R);
  TORCH_CHECK_VALUE(Hq / Hkv <= memops_hls::kMaxQueryHeads, "memops.", op,
                    " on fpga: at most ", memops_hls::kMaxQueryHeads,
                    " query heads per kv head (Hq / Hkv, the kernel's query buffer), got ",
                    Hq / Hkv);
  const RelevancyMode m = parse_relevancy_mode(op, mode_s);
  const GroupReduce reduce = parse_group_reduce(op, reduce_s);
  const at::Tensor q = word_padded(query), s = word_padded(summary);
  const at::Tensor scales =
      int8 ? *summary_scales : at::empty({0}, query.options().dtype(at::kFloat));
  const at::Tensor pages = int_vector_or(num_pages, query, B, N);
  const at::Tensor w = weights.has_value()
                           ? weights->to(at::kFloat).contiguous()
                           : at::empty({1}, query.options().dtype(at::kFloat));
  at::Tensor top_scores = at::empty({B, Hkv, k}, query.options().dtype(at::kFloat));
  at::Tensor top_indices = at::empty({B, Hkv, k}, query.options().dtype(at::kInt));
  if (B * Hkv > 0) {
    Launch launch("memops_topk_relevancy");
    for (const at::Tensor* t : std::initializer_list<const at::Tensor*>{&q, &s, &pages, &w, &top_scores, &top_indices})
      launch.buffer(*t);
    for (int64_t v : {word_offset(q), word_offset(s), element_offset(pages),
                      element_offset(w), int64_t{0}, int64_t{0}, B, Hq, Hkv, R,
                      words(q, q.size(2)), k, sink_pages, recent_pages, words(q, q.stride(0)),
                      words(q, q.stride(1)), words(s, s.stride(0)),
                      words(s, s.stride(1)), words(s, s.stride(2)),
                      words(s, s.stride(3)), static_cast<int64_t>(m),
                      static_cast<int64_t>(reduce), dtype_code(op, query)})
      launch.scalar(v);
    launch.buffer(scales);
    for (int64_t v : {element_offset(scales), int8 ? scales.stride(0) : int64_t{0},
                      int8 ? scales.stride(1) : int64_t{0}, int8 ? scales.stride(2) : int64_t{0},
                      int8 ? int64_t{memops_hls::kInt8} : dtype_code(op, query)})
      launch.scalar(v);
    launch.run();
  }
  return {top_scores, top_indices};
}

std::tuple<at::Tensor, at::Tensor> gather_retrieve_fpga(const at::Tensor& memory,
                                                        const at::Tensor& indices,
                                                        int64_t page_size,
                                                        const std::optional<at::Tensor>& seq_lens) {
  const char* op = "gather_retrieve";
  check_gather_retrieve(memory, indices, page_size, seq_lens);
  const int64_t B = memory.size(0), H = memory.size(1), S = memory.size(2), D = memory.size(3);
  const int64_t k = indices.size(2);
  check_indices_values(op, indices, ceil_div(S, page_size));
  check_seq_lens_values(op, seq_lens, S);
  const at::Tensor mem = word_padded(memory);
  at::Tensor out = at::empty({B, H, k * page_size, mem.size(3)}, memory.options());
  at::Tensor lengths = at::empty({B, H}, indices.options());
  if (B * H > 0 && k > 0) {
    const at::Tensor lens = int_vector_or(seq_lens, memory, B, S);
    Launch launch("memops_gather_retrieve");
    for (const at::Tensor* t : std::initializer_list<const at::Tensor*>{&mem, &indices, &lens, &out, &lengths}) launch.buffer(*t);
    for (int64_t v : {word_offset(mem), element_offset(indices), element_offset(lens),
                      int64_t{0}, int64_t{0}, B, H, words(mem, mem.size(3)), k, page_size,
                      words(mem, mem.stride(0)), words(mem, mem.stride(1)),
                      words(mem, mem.stride(2)), indices.stride(0), indices.stride(1),
                      indices.stride(2)})
      launch.scalar(v);
    launch.run();
  }
  return {unpadded(out, D), lengths};
}

constexpr const char* kApplyPlacement =
    " is not offered on the fpga device: the FPGA runs Prepare Memory, Relevancy and Retrieval; "
    "place Apply on \"cuda\" or \"cpu\" (e.g. gather_retrieve on fpga, then move its output with "
    ".to(\"cuda\"))";

std::tuple<at::Tensor, at::Tensor> sparse_apply_fpga(
    const at::Tensor& query, const at::Tensor& k_cache, const at::Tensor& v_cache,
    const std::optional<at::Tensor>& indices, int64_t page_size,
    const std::optional<at::Tensor>& seq_lens, std::optional<double> scale) {
  check_sparse_apply(query, k_cache, v_cache, indices, page_size, seq_lens, scale);
  TORCH_CHECK(false, "memops.sparse_apply", kApplyPlacement);
}

std::tuple<at::Tensor, at::Tensor> merge_attention_fpga(const at::Tensor& out_a,
                                                        const at::Tensor& lse_a,
                                                        const at::Tensor& out_b,
                                                        const at::Tensor& lse_b) {
  check_merge_attention(out_a, lse_a, out_b, lse_b);
  TORCH_CHECK(false, "memops.merge_attention", kApplyPlacement);
}

// --- memops_fpga: the runtime as torch_memops.fpga sees it ------------------------------------

std::string backend_name() { return fpga_runtime().backend(); }
std::string device_name() { return fpga_runtime().device_name(); }
std::string loaded_xclbin() { return fpga_runtime().loaded_xclbin(); }

void load_xclbin(c10::string_view path) {
  try {
    fpga_runtime().load_xclbin(std::string(path));
  } catch (const c10::Error&) {
    throw;
  } catch (const std::exception& e) {
    TORCH_CHECK(false, "fpga: cannot load xclbin ", path, ": ", e.what());
  }
}

int64_t get_default_bank() { return default_bank(); }
void put_default_bank(int64_t bank) { set_default_bank(static_cast<int>(bank)); }
int64_t native_devices() { return native_device_count(); }
bool native_built() { return native_runtime_built(); }

at::Tensor empty_buffer(at::IntArrayRef size, at::ScalarType dtype, int64_t bank,
                        bool device_only) {
  return empty_in_bank(size, dtype, static_cast<int>(bank), device_only);
}

int64_t bank_of(const at::Tensor& t) {
  BufferObject* bo = buffer_of(t);
  TORCH_CHECK_VALUE(bo != nullptr, "fpga: `t` has no buffer object (no storage bytes)");
  return bo->bank();
}

void sync_tensor(const at::Tensor& t, c10::string_view direction) {
  TORCH_CHECK_VALUE(direction == "to_device" || direction == "from_device",
                    "fpga.sync: `direction` must be \"to_device\" or \"from_device\", got \"",
                    direction, "\"");
  sync_view(t, direction == "to_device" ? SyncDirection::kToDevice : SyncDirection::kFromDevice);
}

at::Tensor host_copy(const at::Tensor& t) { return host_alias(t); }

}  // namespace

TORCH_LIBRARY_IMPL(memops, FPGA, m) {
  m.impl("prepare_memory", &prepare_memory_fpga);
  m.impl("prepare_memory_", &prepare_memory_inplace_fpga);
  m.impl("prepare_memory_int8", &prepare_memory_int8_fpga);
  m.impl("prepare_memory_int8_", &prepare_memory_int8_inplace_fpga);
  m.impl("topk_relevancy", &topk_relevancy_fpga);
  m.impl("gather_retrieve", &gather_retrieve_fpga);
  m.impl("sparse_apply", &sparse_apply_fpga);
  m.impl("merge_attention", &merge_attention_fpga);
}

TORCH_LIBRARY(memops_fpga, m) {
  m.def("backend() -> str", &backend_name);
  m.def("device_name() -> str", &device_name);
  m.def("load_xclbin(str path) -> ()", &load_xclbin);
  m.def("loaded_xclbin() -> str", &loaded_xclbin);
  m.def("default_bank() -> int", &get_default_bank);
  m.def("set_default_bank(int bank) -> ()", &put_default_bank);
  m.def("native_device_count() -> int", &native_devices);
  m.def("native_built() -> bool", &native_built);
  m.def("empty(int[] size, ScalarType dtype, int bank, bool device_only) -> Tensor",
        &empty_buffer);
  m.def("bank_of(Tensor t) -> int", &bank_of);
  m.def("sync(Tensor t, str direction) -> ()", &sync_tensor);
  m.def("host_copy(Tensor t) -> Tensor", &host_copy);
}

}  // namespace memops::fpga
