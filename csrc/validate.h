// Argument validation shared by every backend: one function per op. Each check names the
// argument, what was expected and what came. Shape, dtype and device checks only: value checks
// (index ranges, seq_lens) need the data and live with the host backends (check_values_*).
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <string>

#include "memops/common.h"

namespace memops {

SummaryMode parse_summary_mode(const std::string& op, const std::string& mode);
RelevancyMode parse_relevancy_mode(const std::string& op, const std::string& mode);
GroupReduce parse_group_reduce(const std::string& op, const std::string& group_reduce);

void check_prepare_memory(const at::Tensor& keys, int64_t page_size, const std::string& mode,
                          const std::optional<at::Tensor>& seq_lens);
void check_prepare_memory_inplace(const at::Tensor& summary, const at::Tensor& keys,
                                  int64_t page_size, int64_t first_page, const std::string& mode,
                                  const std::optional<at::Tensor>& seq_lens);
void check_topk_relevancy(const at::Tensor& query, const at::Tensor& summary, int64_t k,
                          const std::string& mode, const std::optional<at::Tensor>& num_pages,
                          int64_t sink_pages, int64_t recent_pages,
                          const std::string& group_reduce,
                          const std::optional<at::Tensor>& weights,
                          const std::optional<at::Tensor>& summary_scales = std::nullopt,
                          const char* op = "topk_relevancy");
void check_prepare_memory_int8(const at::Tensor& keys, int64_t page_size,
                               const std::optional<at::Tensor>& seq_lens);
// The int8 summaries (quantize.h): `summary` int8 [B, Hkv, >= ceil(S/P), 2, D], `scales`
// float32 [B, Hkv, N] with N of `summary`.
void check_prepare_memory_int8_inplace(const at::Tensor& summary, const at::Tensor& scales,
                                       const at::Tensor& keys, int64_t page_size,
                                       int64_t first_page,
                                       const std::optional<at::Tensor>& seq_lens);
void check_gather_retrieve(const at::Tensor& memory, const at::Tensor& indices, int64_t page_size,
                           const std::optional<at::Tensor>& seq_lens);
void check_sparse_apply(const at::Tensor& query, const at::Tensor& k_cache,
                        const at::Tensor& v_cache, const std::optional<at::Tensor>& indices,
                        int64_t page_size, const std::optional<at::Tensor>& seq_lens,
                        std::optional<double> scale = std::nullopt,
                        const char* op = "sparse_apply");
// topk_relevancy then sparse_apply over its selection (`mode` bound or dot), in one op: the
// checks of both (errors name topk_sparse_apply), `summary` of the cache's B and Hkv, and no
// page of `summary` outside the cache.
void check_topk_sparse_apply(const at::Tensor& query, const at::Tensor& summary,
                             const at::Tensor& k_cache, const at::Tensor& v_cache, int64_t k,
                             int64_t page_size, const std::string& mode,
                             const std::optional<at::Tensor>& num_pages,
                             const std::optional<at::Tensor>& seq_lens, int64_t sink_pages,
                             int64_t recent_pages, const std::string& group_reduce,
                             std::optional<double> scale,
                             const std::optional<at::Tensor>& summary_scales);
void check_merge_attention(const at::Tensor& out_a, const at::Tensor& lse_a,
                           const at::Tensor& out_b, const at::Tensor& lse_b);

// The output of prepare_memory, [B, Hkv, ceil(S / P), R, D] like `keys`, uninitialised.
at::Tensor new_summary(const at::Tensor& keys, int64_t page_size, SummaryMode mode);
// The outputs of prepare_memory_int8: codes int8 [B, Hkv, N, 2, D], scales float32 [B, Hkv, N].
std::tuple<at::Tensor, at::Tensor> new_int8_summary(const at::Tensor& keys, int64_t page_size);

// Value checks for backends whose data the host can read without a device sync (CPU, FPGA
// emulation reads its host copy). `seq_lens` in [0, S]; `num_pages` in [0, N]; `indices` in
// [-1, N).
void check_seq_lens_values(const char* op, const std::optional<at::Tensor>& seq_lens,
                           int64_t num_tokens);
void check_num_pages_values(const char* op, const std::optional<at::Tensor>& num_pages,
                            int64_t num_pages_total);
void check_indices_values(const char* op, const at::Tensor& indices, int64_t num_pages_total);

// Checked mode of the device backends (csrc/value_checks.cpp, torch_memops.set_value_checks):
// when on, they run the value checks above before launching (a host sync), except while a CUDA
// graph is being captured. Without it they apply the out-of-range rule of docs/design.md.
bool value_checks_enabled();
void set_value_checks(bool enabled);

// The device-side value-error word of a CUDA device (an int32 tensor of one element that the
// kernels OR kValueError* bits into, gpu_params.h). The CUDA bindings register the function
// that returns it; memops_settings::value_error_word calls it.
using ValueErrorWordFn = at::Tensor (*)(int64_t device_index);
void register_cuda_value_error_word(ValueErrorWordFn fn);

}  // namespace memops
