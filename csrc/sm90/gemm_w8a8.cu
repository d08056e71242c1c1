// W8A8 GEMM for Hopper (sm_90a) from CUTLASS 3 collectives: TMA loads into a warp-specialized wgmma
// mainloop (no per-MMA wait; producer warps do the address work) and an epilogue visitor tree that applies
// the numerics contract of DESIGN.md §3 in the order of the Triton kernels' `linear_epilogue`
// (gemm_w8a8.cuh). z[m] and s_a[m] are per-row vectors — each row's sample's timestep-group entries, gathered
// on the device by the Python wrapper — so nothing here reads the host. This file checks the operands, picks
// a tile and registers the op; the tiles are compiled in gemm_w8a8_<tile>.cu. Built only for sm_90a, as its
// own op library (torch.ops.tcaq_sm90), so csrc/*.cu keep building for every architecture.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/extension.h>

#include <string>
#include <vector>

#include "gemm_w8a8.cuh"

namespace tcaq {
namespace {

void check_vector(const at::Tensor& t, int64_t n, at::ScalarType type, const char* name) {
  TORCH_CHECK(t.is_cuda() && t.scalar_type() == type && t.dim() == 1 && t.size(0) == n && t.is_contiguous(),
              "gemm_w8a8_sm90: ", name, " must be a contiguous CUDA ", c10::toString(type), " vector of ", n,
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

// out[M, N] (bf16) = the contract's epilogue of a[M, K] (int8 codes) × w[N, K]ᵀ (int8 weights); `tile` is
// "auto", "128x128", "64x128" or "128x256".
at::Tensor gemm_w8a8_sm90_out(const at::Tensor& a, const at::Tensor& w, const at::Tensor& w_sum,
                              const at::Tensor& w_scale, const c10::optional<at::Tensor>& bias,
                              const at::Tensor& zero_row, const at::Tensor& scale_row, at::Tensor out,
                              c10::string_view tile) {
  TORCH_CHECK(a.is_cuda() && a.scalar_type() == at::kChar && a.dim() == 2 && a.is_contiguous(),
              "gemm_w8a8_sm90: a must be contiguous int8 codes [M, K], got ", a.scalar_type(), " ", a.sizes());
  TORCH_CHECK(w.is_cuda() && w.scalar_type() == at::kChar && w.dim() == 2 && w.is_contiguous() &&
                  w.size(1) == a.size(1),
              "gemm_w8a8_sm90: w must be contiguous int8 [N, K] with K = ", a.size(1), ", got ", w.sizes());
  const int64_t M = a.size(0), K = a.size(1), N = w.size(0);
  TORCH_CHECK(K % 16 == 0 && N % 8 == 0,
              "gemm_w8a8_sm90: TMA needs K % 16 == 0 and N % 8 == 0, got K = ", K, ", N = ", N);
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
              "gemm_w8a8_sm90: out must be contiguous bf16 [", M, ", ", N, "], got ", out.sizes());
  c10::cuda::CUDAGuard guard(a.device());
  const int device = a.get_device();
  std::string name(tile);
  if (name == "auto") name = pick_tile(M, N, device);
  sm90::GemmW8A8Args args{a.data_ptr<int8_t>(), w.data_ptr<int8_t>(), w_sum.data_ptr<int32_t>(),
                          w_scale.data_ptr<float>(), bias_ptr, zero_row.data_ptr<int32_t>(),
                          scale_row.data_ptr<float>(), out.data_ptr(), static_cast<int>(M), static_cast<int>(N),
                          static_cast<int>(K), device, c10::cuda::getCurrentCUDAStream()};
  std::vector<at::Tensor> keep{a};
  const char* error = nullptr;
  if (name == "128x128") {
    error = sm90::gemm_w8a8_128x128(args, allocate, &keep);
  } else if (name == "64x128") {
    error = sm90::gemm_w8a8_64x128(args, allocate, &keep);
  } else if (name == "128x256") {
    error = sm90::gemm_w8a8_128x256(args, allocate, &keep);
  } else {
    TORCH_CHECK(false, "gemm_w8a8_sm90: tile must be auto, 128x128, 64x128 or 128x256, got '", name, "'");
  }
  TORCH_CHECK(error[0] == '\0', "gemm_w8a8_sm90 (", name, " tiles, M = ", M, ", N = ", N, ", K = ", K, "): ",
              error);
  return out;
}

}  // namespace tcaq

TORCH_LIBRARY(tcaq_sm90, m) {
  m.def("gemm_w8a8_out(Tensor a, Tensor w, Tensor w_sum, Tensor w_scale, Tensor? bias, Tensor zero_row, "
        "Tensor scale_row, Tensor(a!) out, str tile='auto') -> Tensor(a!)");
}

TORCH_LIBRARY_IMPL(tcaq_sm90, CUDA, m) { m.impl("gemm_w8a8_out", &tcaq::gemm_w8a8_sm90_out); }

PYBIND11_MODULE(TORCH_EXTENSION_NAME, module) {
  module.doc() = "tcaq-kernels sm_90a CUTLASS ops (torch.ops.tcaq_sm90)";
}
