// Every memops schema, in one place. Backends (cpu/, cuda/, fpga/) only implement them.
#include <Python.h>
#include <torch/library.h>

// Importing torch_memops._C runs the static registrations below; the module itself is empty.
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}

TORCH_LIBRARY(memops, m) {
  m.def(
      "prepare_memory(Tensor keys, int page_size, *, str mode=\"minmax\", "
      "Tensor? seq_lens=None) -> Tensor");
  // Named summary_mode, not mode: torch.compile functionalizes this in-place op through the
  // auto_functionalized higher-order op, whose handlers take a positional `mode` parameter and
  // fail with "got multiple values for argument 'mode'". The Python wrapper keeps `mode`.
  m.def(
      "prepare_memory_(Tensor(a!) summary, Tensor keys, int page_size, int first_page, *, "
      "str summary_mode=\"minmax\", Tensor? seq_lens=None) -> ()");
  m.def(
      "topk_relevancy(Tensor query, Tensor summary, int k, *, str mode=\"bound\", "
      "Tensor? num_pages=None, int sink_pages=0, int recent_pages=0, "
      "str group_reduce=\"max\", Tensor? weights=None, Tensor? summary_scales=None) "
      "-> (Tensor, Tensor)");
  // Bound-preserving int8 minmax summaries: codes int8 [B, Hkv, N, 2, D] and power-of-two
  // scales float32 [B, Hkv, N] (csrc/include/memops/quantize.h defines them). topk_relevancy
  // takes them as `summary` + `summary_scales`.
  m.def(
      "prepare_memory_int8(Tensor keys, int page_size, *, Tensor? seq_lens=None) "
      "-> (Tensor, Tensor)");
  m.def(
      "prepare_memory_int8_(Tensor(a!) summary, Tensor(b!) scales, Tensor keys, int page_size, "
      "int first_page, *, Tensor? seq_lens=None) -> ()");
  m.def(
      "gather_retrieve(Tensor memory, Tensor indices, int page_size, *, "
      "Tensor? seq_lens=None) -> (Tensor, Tensor)");
  m.def(
      "sparse_apply(Tensor query, Tensor k_cache, Tensor v_cache, Tensor? indices, "
      "int page_size, *, Tensor? seq_lens=None, float? scale=None) -> (Tensor, Tensor)");
  // topk_relevancy then sparse_apply over its selection, one op: every backend runs both ops;
  // CUDA can run the decode step of a layer in one launch (topk_sparse_apply_tc.cuh, opt-in).
  m.def(
      "topk_sparse_apply(Tensor query, Tensor summary, Tensor k_cache, Tensor v_cache, int k, "
      "int page_size, *, str mode=\"bound\", Tensor? num_pages=None, Tensor? seq_lens=None, "
      "int sink_pages=0, int recent_pages=0, str group_reduce=\"max\", float? scale=None, "
      "Tensor? summary_scales=None) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "merge_attention(Tensor out_a, Tensor lse_a, Tensor out_b, Tensor lse_b) "
      "-> (Tensor, Tensor)");
}
