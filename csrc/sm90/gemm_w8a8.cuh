// The CUTLASS 3 W8A8 GEMM of gemm_w8a8.cu as a template over its tile and schedules; each gemm_w8a8_<tile>.cu
// instantiates one (separate translation units: each takes minutes to compile, and they build in parallel).
#pragma once

#include <cstdint>

#include <cuda_runtime.h>

namespace tcaq::sm90 {

// One call's operands, already checked by the dispatcher: a [M, K] and w [N, K] int8 row-major, per-column
// w_sum (int32), w_scale and bias (fp32; bias may be null), per-row zero (int32) and scale (fp32), out bf16.
struct GemmW8A8Args {
  const int8_t* a;
  const int8_t* w;
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
const char* gemm_w8a8_128x128(const GemmW8A8Args& args, void* workspace_alloc(size_t, void*), void* alloc_ctx);
const char* gemm_w8a8_64x128(const GemmW8A8Args& args, void* workspace_alloc(size_t, void*), void* alloc_ctx);
const char* gemm_w8a8_128x256(const GemmW8A8Args& args, void* workspace_alloc(size_t, void*), void* alloc_ctx);

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
// order — the zero-point term in int32 (exact), the scale product first, one fused multiply-add.
template <class TileShape>
struct ContractEpilogue {
  using RowI32 = fusion::Sm90ColBroadcast<0, TileShape, int32_t>;  // one value per output row m
  using RowF32 = fusion::Sm90ColBroadcast<0, TileShape, float>;
  using ColI32 = fusion::Sm90RowBroadcast<0, TileShape, int32_t>;  // one value per output column n
  using ColF32 = fusion::Sm90RowBroadcast<0, TileShape, float>;
  using ZeroTerm = fusion::Sm90EVT<fusion::Sm90Compute<cutlass::multiplies, int32_t, int32_t, kRound>, RowI32, ColI32>;
  using Corrected = fusion::Sm90EVT<fusion::Sm90Compute<cutlass::minus, int32_t, int32_t, kRound>,
                                    fusion::Sm90AccFetch, ZeroTerm>;
  using Scale = fusion::Sm90EVT<fusion::Sm90Compute<cutlass::multiplies, float, float, kRound>, ColF32, RowF32>;
  using Tree = fusion::Sm90EVT<fusion::Sm90Compute<cutlass::homogeneous_multiply_add, Bf16, float, kRound>,
                               Corrected, Scale, ColF32>;
};

template <class TileShape, class MainloopSchedule, class EpilogueSchedule>
const char* run_gemm_w8a8(const GemmW8A8Args& p, void* workspace_alloc(size_t, void*), void* alloc_ctx) {
  using namespace cute;
  using ClusterShape = Shape<_1, _1, _1>;
  using Epilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, TileShape, ClusterShape,
      cutlass::epilogue::collective::EpilogueTileAuto, int32_t, float, void, cutlass::layout::RowMajor, 8, Bf16,
      cutlass::layout::RowMajor, 8, EpilogueSchedule, typename ContractEpilogue<TileShape>::Tree>::CollectiveOp;
  // A: codes [M, K] row-major; B: the weights [N, K] row-major, i.e. K × N column-major; 16-byte TMA rows.
  using Mainloop = typename cutlass::gemm::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, int8_t, cutlass::layout::RowMajor, 16, int8_t,
      cutlass::layout::ColumnMajor, 16, int32_t, TileShape, ClusterShape,
      cutlass::gemm::collective::StageCountAutoCarveout<static_cast<int>(sizeof(typename Epilogue::SharedStorage))>,
      MainloopSchedule>::CollectiveOp;
  using Kernel = cutlass::gemm::kernel::GemmUniversal<Shape<int, int, int, int>, Mainloop, Epilogue>;
  using Gemm = cutlass::gemm::device::GemmUniversalAdapter<Kernel>;
  using StrideA = typename Gemm::GemmKernel::StrideA;
  using StrideB = typename Gemm::GemmKernel::StrideB;
  using StrideC = typename Gemm::GemmKernel::StrideC;
  using StrideD = typename Gemm::GemmKernel::StrideD;

  cutlass::KernelHardwareInfo hw;
  hw.device_id = p.device;
  hw.sm_count = cutlass::KernelHardwareInfo::query_device_multiprocessor_count(p.device);
  typename Gemm::Arguments args{
      cutlass::gemm::GemmUniversalMode::kGemm,
      {p.m, p.n, p.k, 1},
      {p.a, cutlass::make_cute_packed_stride(StrideA{}, {p.m, p.k, 1}), p.w,
       cutlass::make_cute_packed_stride(StrideB{}, {p.n, p.k, 1})},
      {{},
       nullptr,
       cutlass::make_cute_packed_stride(StrideC{}, {p.m, p.n, 1}),
       static_cast<Bf16*>(p.out),
       cutlass::make_cute_packed_stride(StrideD{}, {p.m, p.n, 1})},
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

// Defines gemm_w8a8_<NAME> for BM × BN tiles (K steps of 128 int8 values) and the kernel schedule SCHEDULE
// (Cooperative: two consumer warpgroups share a tile; Pingpong: they alternate tiles).
#define TCAQ_SM90_GEMM_TILE(NAME, BM, BN, SCHEDULE, EPILOGUE_SCHEDULE)                                     \
  namespace tcaq::sm90 {                                                                                  \
  const char* gemm_w8a8_##NAME(const GemmW8A8Args& args, void* workspace_alloc(size_t, void*), void* ctx) { \
    using Tile = cute::Shape<cute::Int<BM>, cute::Int<BN>, cute::Int<128>>;                               \
    return run_gemm_w8a8<Tile, cutlass::gemm::SCHEDULE, cutlass::epilogue::EPILOGUE_SCHEDULE>(            \
        args, workspace_alloc, ctx);                                                                      \
  }                                                                                                       \
  }
#endif  // TCAQ_SM90_GEMM_IMPL
