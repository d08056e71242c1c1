// The CUTLASS 3 W8A8 / W4A8 GEMMs of gemm.cu as a template over tile, schedules and weight width; each
// gemm_w{8,4}a8_<tile>.cu instantiates one (separate translation units: each takes minutes to compile, and
// they build in parallel).
#pragma once

#include <cstdint>

#include <cuda_runtime.h>

namespace tcaq::sm90 {

// One call's operands, already checked by the dispatcher: a [M, K] int8 codes and the weights w [N, K] row-major
// (int8, or for W4 `pack_int4`'s bytes: two int4 a byte along K, the low nibble first — CUTLASS's int4b_t order),
// per-column w_sum (int32), w_scale and bias (fp32; bias may be null), per-row zero (int32) and scale (fp32),
// out bf16 [M, N].
struct GemmArgs {
  const int8_t* a;
  const void* w;
  const int32_t* w_sum;
  const float* w_scale;
  const float* bias;
  const int32_t* zero_row;
  const float* scale_row;
  void* out;
  int m, n, k, device;
  cudaStream_t stream;
};

// Returns an empty string on success, else what failed (can_implement, initialize or launch).
using WorkspaceAlloc = void* (*)(size_t, void*);
const char* gemm_w8a8_128x128(const GemmArgs& args, WorkspaceAlloc alloc, void* alloc_ctx);
const char* gemm_w8a8_64x128(const GemmArgs& args, WorkspaceAlloc alloc, void* alloc_ctx);
const char* gemm_w8a8_128x256(const GemmArgs& args, WorkspaceAlloc alloc, void* alloc_ctx);
const char* gemm_w4a8_128x128(const GemmArgs& args, WorkspaceAlloc alloc, void* alloc_ctx);

}  // namespace tcaq::sm90

#ifdef TCAQ_SM90_GEMM_IMPL
#include "cute/tensor.hpp"
#include "cutlass/cutlass.h"
#include "cutlass/epilogue/collective/collective_builder.hpp"
#include "cutlass/epilogue/fusion/sm90_callbacks_tma_warpspecialized.hpp"
#include "cutlass/gemm/collective/collective_builder.hpp"
#include "cutlass/gemm/device/gemm_universal_adapter.h"
#include "cutlass/gemm/kernel/gemm_universal.hpp"
#include "cutlass/util/packed_stride.hpp"

namespace tcaq::sm90 {

namespace fusion = cutlass::epilogue::fusion;
constexpr auto kRound = cutlass::FloatRoundStyle::round_to_nearest;
using Bf16 = cutlass::bfloat16_t;

// y[m, n] = bf16( float(acc[m, n] − z[m]·Σw[n]) · (s_w[n]·s_a[m]) + bias[n] ): the Triton `linear_epilogue`'s
// order — the zero-point term in int32 (exact), the scale product first, one fused multiply-add. Transposed:
// the kernel computes outᵀ (W4A8 below), so an activation row m is a column of its problem and a channel n a row.
template <class TileShape, bool Transposed>
struct ContractEpilogue {
  template <class T>
  using ByProblemRow = fusion::Sm90ColBroadcast<0, TileShape, T>;  // one value per row of the kernel's problem
  template <class T>
  using ByProblemCol = fusion::Sm90RowBroadcast<0, TileShape, T>;  // one value per column
  template <class T>
  using PerActivationRow = cute::conditional_t<Transposed, ByProblemCol<T>, ByProblemRow<T>>;
  template <class T>
  using PerChannel = cute::conditional_t<Transposed, ByProblemRow<T>, ByProblemCol<T>>;
  using ZeroTerm = fusion::Sm90EVT<fusion::Sm90Compute<cutlass::multiplies, int32_t, int32_t, kRound>,
                                   PerActivationRow<int32_t>, PerChannel<int32_t>>;
  using Corrected = fusion::Sm90EVT<fusion::Sm90Compute<cutlass::minus, int32_t, int32_t, kRound>,
                                    fusion::Sm90AccFetch, ZeroTerm>;
  using Scale = fusion::Sm90EVT<fusion::Sm90Compute<cutlass::multiplies, float, float, kRound>, PerChannel<float>,
                                PerActivationRow<float>>;
  using Tree = fusion::Sm90EVT<fusion::Sm90Compute<cutlass::homogeneous_multiply_add, Bf16, float, kRound>,
                               Corrected, Scale, PerChannel<float>>;
};

// W8A8: out [M, N] = A·Wᵀ, A the problem's A operand. W4A8: CUTLASS widens the narrower operand in registers
// and only as the A operand, so the kernel computes outᵀ [N, M] = W·Aᵀ — the packed weights as A (K-major), the
// codes as B (K-major) — and stores it column-major, which is out [M, N] row-major.
template <class TileShape, class MainloopSchedule, class EpilogueSchedule, bool W4>
const char* run_gemm(const GemmArgs& p, WorkspaceAlloc workspace_alloc, void* alloc_ctx) {
  using namespace cute;
  using ClusterShape = Shape<_1, _1, _1>;
  using ElementA = cute::conditional_t<W4, cutlass::int4b_t, int8_t>;
  using LayoutD = cute::conditional_t<W4, cutlass::layout::ColumnMajor, cutlass::layout::RowMajor>;
  constexpr int kAlignA = W4 ? 32 : 16;  // 16-byte TMA rows
  using Epilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, TileShape, ClusterShape,
      cutlass::epilogue::collective::EpilogueTileAuto, int32_t, float, void, LayoutD, 8, Bf16, LayoutD, 8,
      EpilogueSchedule, typename ContractEpilogue<TileShape, W4>::Tree>::CollectiveOp;
  // The problem's A [rows, K] row-major and B [cols, K] row-major, i.e. K × cols column-major: both K-major.
  using Mainloop = typename cutlass::gemm::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, ElementA, cutlass::layout::RowMajor, kAlignA, int8_t,
      cutlass::layout::ColumnMajor, 16, int32_t, TileShape, ClusterShape,
      cutlass::gemm::collective::StageCountAutoCarveout<static_cast<int>(sizeof(typename Epilogue::SharedStorage))>,
      MainloopSchedule>::CollectiveOp;
  using Kernel = cutlass::gemm::kernel::GemmUniversal<Shape<int, int, int, int>, Mainloop, Epilogue>;
  using Gemm = cutlass::gemm::device::GemmUniversalAdapter<Kernel>;
  using StrideA = typename Gemm::GemmKernel::StrideA;
  using StrideB = typename Gemm::GemmKernel::StrideB;
  using StrideC = typename Gemm::GemmKernel::StrideC;
  using StrideD = typename Gemm::GemmKernel::StrideD;

  const int rows = W4 ? p.n : p.m, cols = W4 ? p.m : p.n;
  const auto* a_op = static_cast<const ElementA*>(W4 ? p.w : static_cast<const void*>(p.a));
  const auto* b_op = static_cast<const int8_t*>(W4 ? static_cast<const void*>(p.a) : p.w);
  cutlass::KernelHardwareInfo hw;
  hw.device_id = p.device;
  hw.sm_count = cutlass::KernelHardwareInfo::query_device_multiprocessor_count(p.device);
  typename Gemm::Arguments args{
      cutlass::gemm::GemmUniversalMode::kGemm,
      {rows, cols, p.k, 1},
      {a_op, cutlass::make_cute_packed_stride(StrideA{}, {rows, p.k, 1}), b_op,
       cutlass::make_cute_packed_stride(StrideB{}, {cols, p.k, 1})},
      {{},
       nullptr,
       cutlass::make_cute_packed_stride(StrideC{}, {rows, cols, 1}),
       static_cast<Bf16*>(p.out),
       cutlass::make_cute_packed_stride(StrideD{}, {rows, cols, 1})},
      hw};
  // Each node's arguments: its children's in order, then its own op's.
  args.epilogue.thread = {
      {{}, {{p.zero_row}, {p.w_sum}, {}}, {}},  // acc − z·Σw
      {{p.w_scale}, {p.scale_row}, {}},         // s_w·s_a
      {p.bias},                                 // bias (null reads as 0)
      {}};
  Gemm gemm;
  if (gemm.can_implement(args) != cutlass::Status::kSuccess) return "can_implement refused the problem";
  void* workspace = workspace_alloc(Gemm::get_workspace_size(args), alloc_ctx);
  if (gemm.initialize(args, workspace, p.stream) != cutlass::Status::kSuccess) return "initialize failed";
  if (gemm.run(p.stream) != cutlass::Status::kSuccess) return "launch failed";
  return "";
}

}  // namespace tcaq::sm90

// Defines gemm_<NAME> (e.g. w8a8_128x128) for BM × BN tiles of the kernel's problem (K steps of 128 values),
// int4 weights where W4, and the kernel schedule SCHEDULE (Cooperative: two consumer warpgroups share a tile;
// Pingpong: they alternate tiles).
#define TCAQ_SM90_GEMM_TILE(NAME, W4, BM, BN, SCHEDULE, EPILOGUE_SCHEDULE)                              \
  namespace tcaq::sm90 {                                                                               \
  const char* gemm_##NAME(const GemmArgs& args, WorkspaceAlloc alloc, void* ctx) {                     \
    using Tile = cute::Shape<cute::Int<BM>, cute::Int<BN>, cute::Int<128>>;                            \
    return run_gemm<Tile, cutlass::gemm::SCHEDULE, cutlass::epilogue::EPILOGUE_SCHEDULE, W4>(args, alloc, \
                                                                                             ctx);     \
  }                                                                                                    \
  }
#endif  // TCAQ_SM90_GEMM_IMPL
