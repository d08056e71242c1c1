// One tile of gemm.cuh's GEMMs per translation unit (each compiles for minutes; they build in parallel).
#define TCAQ_SM90_GEMM_IMPL
#include "gemm.cuh"

TCAQ_SM90_GEMM_TILE(w4a8_128x128, true, 128, 128, KernelTmaWarpSpecializedCooperative, TmaWarpSpecializedCooperative)
