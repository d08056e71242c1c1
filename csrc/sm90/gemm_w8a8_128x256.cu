// One tile of gemm_w8a8.cuh's GEMM per translation unit (each compiles for minutes; they build in parallel).
#define TCAQ_SM90_GEMM_IMPL
#include "gemm_w8a8.cuh"

TCAQ_SM90_GEMM_TILE(128x256, 128, 256, KernelTmaWarpSpecializedCooperative, TmaWarpSpecializedCooperative)
