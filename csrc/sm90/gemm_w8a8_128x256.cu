// One tile of gemm.cuh's GEMMs per translation unit (each compiles for minutes; they build in parallel).
#define TCAQ_SM90_GEMM_IMPL
#include "gemm.cuh"

TCAQ_SM90_GEMM_TILE(w8a8_128x256, false, 128, 256, KernelTmaWarpSpecializedCooperative, TmaWarpSpecializedCooperative)
