// W8A8 and W4A8 GEMMs for Hopper (sm_90a) from CUTLASS 3 collectives: TMA loads into a warp-specialized
// wgmma mainloop (no per-MMA wait; producer warps do the address work; packed int4 weights widened to int8 in
// registers, Hopper having no 4-bit MMA) and an epilogue visitor tree that applies the numerics contract of
// DESIGN.md §3 in the order of the Triton kernels' `linear_epilogue` (gemm.cuh). z[m] and s_a[m] are per-row
// vectors — each row's sample's timestep-group entries, gathered on the device by the Python wrapper — so
// nothing here reads the host. This file checks the operands, picks a tile and registers the op; the tiles
// are compiled in gemm_w{8,4}a8_<tile>.cu. Built only for sm_90a, as its own op library
// (torch.ops.tcaq_sm90), so csrc/*.cu keep building for every architecture.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/extension.h>

#include <string>
#include <vector>

#include "gemm.cuh"

namespace tcaq {
namespace {

void check_vector(const at::Tensor& t, int64_t n, at::ScalarType type, const char* name) {
  TORCH_CHECK(t.is_cuda() && t.scalar_type() == type && t.dim() == 1 && t.size(0) == n && t.is_contiguous(),
              "tcaq_sm90.gemm: ", name, " must be a contiguous CUDA ", c10::toString(type), " vector of ", n,
              " entries, got ", t.scalar_type(), " of shape ", t.sizes());
}

// Workspace for CUTLASS, owned by the tensors the caller keeps until the launch is queued (stream-ordered).
void* allocate(size_t bytes, void* ctx) {
  auto* keep = static_cast<std::vector<at::Tensor>*>(ctx);
  if (bytes == 0) return nullptr;
  keep->push_back(at::empty({static_cast<int64_t>(bytes)}, keep->front().options().dtype(at::kByte)));
  return keep->back().data_ptr();
}

// "auto" (not yet tuned on a GPU): 64×128 pingpong tiles while 128×128 tiles would leave SMs idle, 128×256
// where even those fill the SMs four times over, else 128×128.
std::string pick_tile(int64_t M, int64_t N, int device) {
  int sms = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  const int64_t tiles = ((M + 127) / 128) * ((N + 127) / 128);
  if (tiles < sms) return "64x128";
  if (((M + 127) / 128) * ((N + 255) / 256) >= 4 * sms) return "128x256";
  return "128x128";
}

}  // namespace

// out[M, N] (bf16) = the contract's epilogue of a[M, K] (int8 codes) × w[N, K]ᵀ — int8 weights, or
// `pack_int4`'s uint8 [N, ⌈K/2⌉] for int4 —; `tile`: "auto" or one of the weight width's tiles.
at::Tensor gemm_sm90_out(const at::Tensor& a, const at::Tensor& w, const at::Tensor& w_sum, const at::Tensor& w_scale,
                         const c10::optional<at::Tensor>& bias, const at::Tensor& zero_row,
                         const at::Tensor& scale_row, at::Tensor out, c10::string_view tile) {
  TORCH_CHECK(a.is_cuda() && a.scalar_type() == at::kChar && a.dim() == 2 && a.is_contiguous(),
              "tcaq_sm90.gemm: a must be contiguous int8 codes [M, K], got ", a.scalar_type(), " ", a.sizes());
  const int64_t M = a.size(0), K = a.size(1), N = w.size(0);
  const bool w4 = w.scalar_type() == at::kByte;
  TORCH_CHECK(w.is_cuda() && (w4 || w.scalar_type() == at::kChar) && w.dim() == 2 && w.is_contiguous() &&
                  w.size(1) == (w4 ? (K + 1) / 2 : K),
              "tcaq_sm90.gemm: w must be contiguous int8 [N, K] or packed int4 uint8 [N, ceil(K/2)] with K = ", K,
              ", got ", w.scalar_type(), " ", w.sizes());
  TORCH_CHECK(K % (w4 ? 32 : 16) == 0 && N % 8 == 0, "tcaq_sm90.gemm: TMA needs K % ", w4 ? 32 : 16,
              " == 0 and N % 8 == 0, got K = ", K, ", N = ", N);
  check_vector(w_sum, N, at::kInt, "w_sum");
  check_vector(w_scale, N, at::kFloat, "w_scale");
  check_vector(zero_row, M, at::kInt, "zero_row");
  check_vector(scale_row, M, at::kFloat, "scale_row");
  const float* bias_ptr = nullptr;
  if (bias.has_value() && bias->defined()) {
    check_vector(*bias, N, at::kFloat, "bias");
    bias_ptr = bias->data_ptr<float>();
  }
  TORCH_CHECK(out.is_cuda() && out.scalar_type() == at::kBFloat16 && out.is_contiguous() && out.size(0) == M &&
                  out.size(1) == N,
              "tcaq_sm90.gemm: out must be contiguous bf16 [", M, ", ", N, "], got ", out.sizes());
  c10::cuda::CUDAGuard guard(a.device());
  const int device = a.get_device();
  std::string name(tile);
  if (name == "auto") name = w4 ? "128x128" : pick_tile(M, N, device);
  sm90::GemmArgs args{a.data_ptr<int8_t>(), w.data_ptr(), w_sum.data_ptr<int32_t>(), w_scale.data_ptr<float>(),
                      bias_ptr, zero_row.data_ptr<int32_t>(), scale_row.data_ptr<float>(), out.data_ptr(),
                      static_cast<int>(M), static_cast<int>(N), static_cast<int>(K), device,
                      c10::cuda::getCurrentCUDAStream()};
  std::vector<at::Tensor> keep{a};
  const char* error = nullptr;
  if (w4 && name == "128x128") {
    error = sm90::gemm_w4a8_128x128(args, allocate, &keep);
  } else if (!w4 && name == "128x128") {
    error = sm90::gemm_w8a8_128x128(args, allocate, &keep);
  } else if (!w4 && name == "64x128") {
    error = sm90::gemm_w8a8_64x128(args, allocate, &keep);
  } else if (!w4 && name == "128x256") {
    error = sm90::gemm_w8a8_128x256(args, allocate, &keep);
  } else {
    TORCH_CHECK(false, "tcaq_sm90.gemm: tile must be auto or one of ", w4 ? "128x128" : "128x128, 64x128, 128x256",
                " for ", w4 ? "int4" : "int8", " weights, got '", name, "'");
  }
  TORCH_CHECK(error[0] == '\0', "tcaq_sm90.gemm (", w4 ? "W4A8" : "W8A8", ", ", name, " tiles, M = ", M, ", N = ", N,
              ", K = ", K, "): ", error);
  return out;
}

}  // namespace tcaq

TORCH_LIBRARY(tcaq_sm90, m) {
  m.def("gemm_out(Tensor a, Tensor w, Tensor w_sum, Tensor w_scale, Tensor? bias, Tensor zero_row, "
        "Tensor scale_row, Tensor(a!) out, str tile='auto') -> Tensor(a!)");
}

TORCH_LIBRARY_IMPL(tcaq_sm90, CUDA, m) { m.impl("gemm_out", &tcaq::gemm_sm90_out); }

PYBIND11_MODULE(TORCH_EXTENSION_NAME, module) {
  module.doc() = "tcaq-kernels sm_90a CUTLASS ops (torch.ops.tcaq_sm90)";
}
