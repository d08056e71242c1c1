// One tile of gemm.cuh's GEMMs per translation unit (each compiles for minutes; they build in parallel).
#define TCAQ_SM90_GEMM_IMPL
#include "gemm.cuh"

TCAQ_SM90_GEMM_TILE(w8a8_64x128, false, 64, 128, KernelTmaWarpSpecializedPingpong, TmaWarpSpecialized)
