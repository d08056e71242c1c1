// W8A8 GEMM for Hopper (sm_90a) from CUTLASS 3 collectives: TMA loads into a warp-specialized wgmma
// mainloop (no per-MMA wait, the producer warps' address work off the math warps) and an epilogue visitor
// tree that applies the numerics contract of DESIGN.md §3 in the same order as the Triton kernels'
// `linear_epilogue`:
//   y[m, n] = bf16( float(acc[m, n] − z[m]·Σw[n]) · (s_w[n]·s_a[m]) + bias[n] )
// with the zero-point term in int32 (exact), the scale product formed first, one fused multiply-add.
// z[m] and s_a[m] are per-row vectors (the row's sample's timestep-group entries, gathered on the device
// by the Python wrapper), so nothing here reads the host. Built only for sm_90a (wgmma, TMA); its own op
// library, torch.ops.tcaq_sm90, so the portable ops of csrc/*.cu keep building for every architecture.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/extension.h>

#include <cstdint>

#include "cute/tensor.hpp"
#include "cutlass/cutlass.h"
#include "cutlass/epilogue/collective/collective_builder.hpp"
#include "cutlass/epilogue/fusion/sm90_callbacks_tma_warpspecialized.hpp"
#include "cutlass/gemm/collective/collective_builder.hpp"
#include "cutlass/gemm/device/gemm_universal_adapter.h"
#include "cutlass/gemm/kernel/gemm_universal.hpp"
#include "cutlass/util/packed_stride.hpp"

namespace tcaq {
namespace {

using namespace cute;
namespace fusion = cutlass::epilogue::fusion;
constexpr auto kRound = cutlass::FloatRoundStyle::round_to_nearest;
using Bf16 = cutlass::bfloat16_t;

// One tile shape for now: 128 rows (the cooperative schedule's two consumer warpgroups take 64 each)
// × 128 columns × 128 int8 values of K (128 bytes, one TMA box row).
using TileShape = Shape<_128, _128, _128>;
using ClusterShape = Shape<_1, _1, _1>;

using RowVectorI32 = fusion::Sm90ColBroadcast<0, TileShape, int32_t>;  // one value per output row m
using RowVectorF32 = fusion::Sm90ColBroadcast<0, TileShape, float>;
using ColVectorI32 = fusion::Sm90RowBroadcast<0, TileShape, int32_t>;  // one value per output column n
using ColVectorF32 = fusion::Sm90RowBroadcast<0, TileShape, float>;

// z[m]·Σw[n] and acc − that, in int32
using ZeroTerm = fusion::Sm90EVT<fusion::Sm90Compute<cutlass::multiplies, int32_t, int32_t, kRound>,
                                 RowVectorI32, ColVectorI32>;
using Corrected = fusion::Sm90EVT<fusion::Sm90Compute<cutlass::minus, int32_t, int32_t, kRound>,
                                  fusion::Sm90AccFetch, ZeroTerm>;
// s_w[n]·s_a[m] in fp32
using Scale = fusion::Sm90EVT<fusion::Sm90Compute<cutlass::multiplies, float, float, kRound>, ColVectorF32,
                              RowVectorF32>;
// float(corrected)·scale + bias[n] (a null bias reads as 0), rounded to bf16
using Output = fusion::Sm90EVT<fusion::Sm90Compute<cutlass::homogeneous_multiply_add, Bf16, float, kRound>,
                               Corrected, Scale, ColVectorF32>;

using Epilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
    cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, TileShape, ClusterShape,
    cutlass::epilogue::collective::EpilogueTileAuto, int32_t, float, void, cutlass::layout::RowMajor, 8, Bf16,
    cutlass::layout::RowMajor, 8, cutlass::epilogue::TmaWarpSpecializedCooperative, Output>::CollectiveOp;

// A: codes [M, K] row-major; B: the weights [N, K] row-major, i.e. K × N column-major. 16-byte TMA rows.
using Mainloop = typename cutlass::gemm::collective::CollectiveBuilder<
    cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, int8_t, cutlass::layout::RowMajor, 16, int8_t,
    cutlass::layout::ColumnMajor, 16, int32_t, TileShape, ClusterShape,
    cutlass::gemm::collective::StageCountAutoCarveout<static_cast<int>(sizeof(typename Epilogue::SharedStorage))>,
    cutlass::gemm::KernelTmaWarpSpecializedCooperative>::CollectiveOp;

using Kernel = cutlass::gemm::kernel::GemmUniversal<Shape<int, int, int, int>, Mainloop, Epilogue>;
using Gemm = cutlass::gemm::device::GemmUniversalAdapter<Kernel>;

void check_vector(const at::Tensor& t, int64_t n, at::ScalarType type, const char* name) {
  TORCH_CHECK(t.is_cuda() && t.scalar_type() == type && t.dim() == 1 && t.size(0) == n && t.is_contiguous(),
              "gemm_w8a8_sm90: ", name, " must be a contiguous CUDA ", c10::toString(type), " vector of ", n,
              " entries, got ", t.scalar_type(), " of shape ", t.sizes());
}

}  // namespace

// out[M, N] (bf16) = the contract's epilogue of a[M, K] (int8 codes) × w[N, K]ᵀ (int8 weights).
at::Tensor gemm_w8a8_sm90_out(const at::Tensor& a, const at::Tensor& w, const at::Tensor& w_sum,
                              const at::Tensor& w_scale, const c10::optional<at::Tensor>& bias,
                              const at::Tensor& zero_row, const at::Tensor& scale_row, at::Tensor out) {
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

  using StrideA = typename Gemm::GemmKernel::StrideA;
  using StrideB = typename Gemm::GemmKernel::StrideB;
  using StrideC = typename Gemm::GemmKernel::StrideC;
  using StrideD = typename Gemm::GemmKernel::StrideD;
  const int m = static_cast<int>(M), n = static_cast<int>(N), k = static_cast<int>(K);
  cutlass::KernelHardwareInfo hw;
  hw.device_id = a.get_device();
  hw.sm_count = cutlass::KernelHardwareInfo::query_device_multiprocessor_count(hw.device_id);
  typename Gemm::Arguments args{
      cutlass::gemm::GemmUniversalMode::kGemm,
      {m, n, k, 1},
      {a.data_ptr<int8_t>(), cutlass::make_cute_packed_stride(StrideA{}, {m, k, 1}), w.data_ptr<int8_t>(),
       cutlass::make_cute_packed_stride(StrideB{}, {n, k, 1})},
      {{},
       nullptr,
       cutlass::make_cute_packed_stride(StrideC{}, {m, n, 1}),
       reinterpret_cast<Bf16*>(out.data_ptr<at::BFloat16>()),
       cutlass::make_cute_packed_stride(StrideD{}, {m, n, 1})},
      hw};
  // Each node's arguments: its children's in order, then its own op's.
  args.epilogue.thread = {
      {{}, {{zero_row.data_ptr<int32_t>()}, {w_sum.data_ptr<int32_t>()}, {}}, {}},  // acc − z·Σw
      {{w_scale.data_ptr<float>()}, {scale_row.data_ptr<float>()}, {}},             // s_w·s_a
      {bias_ptr},                                                                   // bias (null: 0)
      {}};
  Gemm gemm;
  TORCH_CHECK(gemm.can_implement(args) == cutlass::Status::kSuccess,
              "gemm_w8a8_sm90: CUTLASS cannot run M = ", M, ", N = ", N, ", K = ", K);
  at::Tensor workspace = at::empty({static_cast<int64_t>(Gemm::get_workspace_size(args))},
                                   a.options().dtype(at::kByte));
  auto stream = c10::cuda::getCurrentCUDAStream();
  cutlass::Status status = gemm.initialize(args, workspace.data_ptr(), stream);
  TORCH_CHECK(status == cutlass::Status::kSuccess, "gemm_w8a8_sm90: initialize failed: ",
              cutlass::cutlassGetStatusString(status));
  status = gemm.run(stream);
  TORCH_CHECK(status == cutlass::Status::kSuccess, "gemm_w8a8_sm90: launch failed: ",
              cutlass::cutlassGetStatusString(status));
  return out;
}

}  // namespace tcaq

TORCH_LIBRARY(tcaq_sm90, m) {
  m.def("gemm_w8a8_out(Tensor a, Tensor w, Tensor w_sum, Tensor w_scale, Tensor? bias, Tensor zero_row, "
        "Tensor scale_row, Tensor(a!) out) -> Tensor(a!)");
}

TORCH_LIBRARY_IMPL(tcaq_sm90, CUDA, m) { m.impl("gemm_w8a8_out", &tcaq::gemm_w8a8_sm90_out); }

PYBIND11_MODULE(TORCH_EXTENSION_NAME, module) {
  module.doc() = "tcaq-kernels sm_90a CUTLASS ops (torch.ops.tcaq_sm90)";
}
