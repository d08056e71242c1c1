// Registers the CUDA ops under torch.ops.tcaq_cuda.*; importing tcaq_kernels._C (or loading the
// JIT-built library) is enough to make them callable.
#include <torch/extension.h>

namespace tcaq {
at::Tensor quantize_act_out(const at::Tensor& x, const at::Tensor& s_inv, const at::Tensor& zero,
                            const at::Tensor& group, const c10::optional<at::Tensor>& r_inv, int64_t bits,
                            int64_t channel_dim, at::Tensor out);
}

TORCH_LIBRARY(tcaq_cuda, m) {
  m.def("quantize_act_out(Tensor x, Tensor s_inv, Tensor zero, Tensor group, Tensor? r_inv, int bits, "
        "int channel_dim, Tensor(a!) out) -> Tensor(a!)");
}

TORCH_LIBRARY_IMPL(tcaq_cuda, CUDA, m) { m.impl("quantize_act_out", &tcaq::quantize_act_out); }

PYBIND11_MODULE(TORCH_EXTENSION_NAME, module) { module.doc() = "tcaq-kernels CUDA ops (torch.ops.tcaq_cuda)"; }
