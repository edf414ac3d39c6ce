// The memops operators have no backward: they serve decode-time inference (selection,
// gathering, attention over a frozen cache). Without an Autograd kernel, PyTorch's fallback
// gives outputs a grad_fn whose backward silently yields no gradient, and prepare_memory_ would
// write into a leaf that requires grad. This kernel, registered for the Autograd alias key
// (every backend's autograd key), refuses both while grad mode is on, naming the argument, and
// otherwise runs the op below autograd. Under torch.no_grad() / torch.inference_mode() the ops
// run as before, on any input.
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/grad_mode.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <torch/library.h>

#include <string>

namespace memops {
namespace {

bool needs_grad(const c10::IValue& v) {
  return v.isTensor() && v.toTensor().defined() && v.toTensor().requires_grad();
}

void refuse_grad(const c10::OperatorHandle& op, c10::DispatchKeySet keys,
                 torch::jit::Stack* stack) {
  const auto& schema = op.schema();
  const size_t n = schema.arguments().size();
  if (c10::GradMode::is_enabled()) {
    for (size_t i = 0; i < n; ++i) {
      const c10::IValue& arg = (*stack)[stack->size() - n + i];
      if (!needs_grad(arg)) continue;
      const auto& formal = schema.arguments()[i];
      const bool written = formal.alias_info() != nullptr && formal.alias_info()->isWrite();
      TORCH_CHECK(false, "memops.", schema.name().substr(schema.name().find("::") + 2), ": `",
                  formal.name(), "` requires grad, but memops operators have no backward",
                  written ? " (and this one writes into it in place)" : "",
                  "; call them under torch.no_grad() or torch.inference_mode(), or pass `",
                  formal.name(), ".detach()`");
    }
  }
  at::AutoDispatchBelowAutograd below;
  op.redispatchBoxed(keys & c10::after_autograd_keyset, stack);
}

}  // namespace

TORCH_LIBRARY_IMPL(memops, Autograd, m) {
  for (const char* name : {"prepare_memory", "prepare_memory_", "prepare_memory_int8",
                           "prepare_memory_int8_", "topk_relevancy",
                           "gather_retrieve", "sparse_apply", "topk_sparse_apply", "merge_attention"})
    m.impl(name, torch::CppFunction::makeFromBoxedFunction<&refuse_grad>());
}

}  // namespace memops
