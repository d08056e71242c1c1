"""W8A8 GEMM for Hopper in Gluon: int8 wgmma kept in flight while the next tiles load.

Why a second GEMM: Triton 3.6 compiles `tl.dot` on int8 to `wgmma … s32.s8.s8` but waits for each one
before issuing the next (`wgmma.wait_group 0`; bf16 and fp8 loops keep one in flight — see
`benchmarks/kernel_asm.py --probe`), so the int8 kernel cannot reach the tensor cores' int8 rate. Gluon
exposes the instruction directly: here each K step issues its MMA asynchronously and waits only for the
previous one (`warpgroup_mma_wait(1)`), and a ring of STAGES shared-memory buffers is filled by cp.async
STAGES-1 steps ahead.

Numerics are `gemm.linear_epilogue`'s: int32 accumulation of the codes, zero-point correction with Σw,
acc·(s_w·s_a[g]) + bias in fp32, one rounding to the output dtype. Scope of this first version: int8
activations and int8 weights, float output, optional bias — no residual, no quantized output, no int4
(`qgemm` keeps those on the `tl.dot` kernel).
"""
from __future__ import annotations

import torch
import triton
from triton.runtime.jit import constexpr_function
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.ampere import async_copy
from triton.experimental.gluon.language.nvidia.hopper import fence_async_shared, warpgroup_mma, warpgroup_mma_wait

from .numerics import tuning_bench

#: (BLOCK_M, BLOCK_N, BLOCK_K, STAGES, num_warps). 128×256 is left out: its accumulator alone fills half of
#: the 255 registers and ptxas spills (benchmarks/kernel_asm.py).
CONFIGS = [(128, 128, 128, 4, 8), (64, 128, 128, 4, 4), (128, 64, 128, 4, 4), (64, 64, 128, 4, 4)]


@constexpr_function
def _instr_n(BLOCK_M, BLOCK_N, num_warps):
    """The widest wgmma N for int8 (a multiple of 16 up to 224, dividing the warps' share of BLOCK_N)."""
    m_reps = triton.cdiv(BLOCK_M, 16)
    n_reps = triton.cdiv(num_warps, m_reps)
    max_n = max(BLOCK_N // n_reps, 16)
    n = 224
    while n > max_n or BLOCK_N % n != 0:
        n -= 16
    return n


@constexpr_function
def _warps(BLOCK_M, num_warps):
    """Warps along M first (each warpgroup takes 64 rows), the rest along N."""
    along_m = min(num_warps, max(4, BLOCK_M // 16))
    return [along_m, num_warps // along_m]


@gluon.jit
def _load_stage(a_smem, w_smem, a_ptrs, w_ptrs, m_ok, n_ok, rk, k_left):
    k_ok = rk < k_left
    async_copy.async_copy_global_to_shared(a_smem, a_ptrs, mask=m_ok[:, None] & k_ok[None, :])
    async_copy.async_copy_global_to_shared(w_smem, w_ptrs, mask=n_ok[:, None] & k_ok[None, :])
    async_copy.commit_group()


@gluon.jit
def _w8a8_wgmma_kernel(
    a_ptr, w_ptr, w_sum_ptr, w_scale_ptr, bias_ptr, out_ptr, scale_ptr, zero_ptr, group_ptr,
    M, N, K, rows_per_sample, group_stride, stride_am, stride_wn, stride_om,
    HAS_BIAS: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, BLOCK_K: gl.constexpr,
    STAGES: gl.constexpr,
):
    num_warps: gl.constexpr = gl.num_warps()
    num_m = (M + BLOCK_M - 1) // BLOCK_M
    pid = gl.program_id(0)
    off_m = (pid % num_m) * BLOCK_M  # neighbouring programs share a weight tile while it is in L2
    off_n = (pid // num_m) * BLOCK_N

    # cp.async of 16 bytes per thread along K
    TK: gl.constexpr = BLOCK_K // 16
    load_layout: gl.constexpr = gl.BlockedLayout([1, 16], [32 // TK, TK], [num_warps, 1], [1, 0])
    rm = off_m + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, load_layout))
    rn = off_n + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, load_layout))
    rk = gl.arange(0, BLOCK_K, layout=gl.SliceLayout(0, load_layout))
    a_ptrs = a_ptr + rm.to(gl.int64)[:, None] * stride_am + rk[None, :]
    w_ptrs = w_ptr + rn.to(gl.int64)[:, None] * stride_wn + rk[None, :]
    m_ok = rm < M
    n_ok = rn < N

    a_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_M, BLOCK_K], gl.int8)
    w_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_N, BLOCK_K], gl.int8)
    a_smem = gl.allocate_shared_memory(gl.int8, [STAGES, BLOCK_M, BLOCK_K], a_layout)
    w_smem = gl.allocate_shared_memory(gl.int8, [STAGES, BLOCK_N, BLOCK_K], w_layout)

    for p in gl.static_range(STAGES - 1):  # prologue: steps 0 … STAGES-2 in flight (empty masks past K)
        _load_stage(a_smem.index(p), w_smem.index(p), a_ptrs + p * BLOCK_K, w_ptrs + p * BLOCK_K,
                    m_ok, n_ok, rk, K - p * BLOCK_K)

    mma_layout: gl.constexpr = gl.NVMMADistributedLayout(
        version=[3, 0], warps_per_cta=_warps(BLOCK_M, num_warps), instr_shape=[16, _instr_n(BLOCK_M, BLOCK_N, num_warps), 32])
    acc = gl.zeros((BLOCK_M, BLOCK_N), gl.int32, mma_layout)
    num_k = (K + BLOCK_K - 1) // BLOCK_K
    for i in range(num_k):
        s = i % STAGES
        async_copy.wait_group(STAGES - 2)  # this thread's copies of step i have landed …
        gl.thread_barrier()  # … and everyone else's
        fence_async_shared()  # generic-proxy writes before the MMA's async-proxy reads
        acc = warpgroup_mma(a_smem.index(s), w_smem.index(s).permute((1, 0)), acc, is_async=True)
        # step i-1's MMA is done: its buffers take step i+STAGES-1 (every warpgroup past the wait first)
        acc = warpgroup_mma_wait(num_outstanding=1, deps=(acc,))
        gl.thread_barrier()
        j = i + STAGES - 1
        _load_stage(a_smem.index(j % STAGES), w_smem.index(j % STAGES), a_ptrs + j * BLOCK_K, w_ptrs + j * BLOCK_K,
                    m_ok, n_ok, rk, K - j * BLOCK_K)
    acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc,))
    async_copy.wait_group(0)

    # epilogue, in the accumulator's own layout: `gemm.linear_epilogue`'s arithmetic, in its order
    em = off_m + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, mma_layout))
    en = off_n + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, mma_layout))
    en_ok = en < N
    g = gl.load(group_ptr + ((em % M) // rows_per_sample) * group_stride)
    zero = gl.load(zero_ptr + g)
    acc = acc - zero[:, None] * gl.load(w_sum_ptr + en, mask=en_ok, other=0)[None, :]
    s_a = gl.load(scale_ptr + g)
    y = acc.to(gl.float32) * (gl.load(w_scale_ptr + en, mask=en_ok, other=0.0)[None, :] * s_a[:, None])
    if HAS_BIAS:
        y = y + gl.load(bias_ptr + en, mask=en_ok, other=0.0).to(gl.float32)[None, :]
    mask = (em < M)[:, None] & en_ok[None, :]
    gl.store(out_ptr + em.to(gl.int64)[:, None] * stride_om + en[None, :], y.to(out_ptr.dtype.element_ty), mask=mask)


_tuned = triton.autotune(
    configs=[triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "STAGES": st}, num_warps=w)
             for bm, bn, bk, st, w in CONFIGS],
    key=["M", "N", "K", "HAS_BIAS"], do_bench=tuning_bench,
)(_w8a8_wgmma_kernel)


def supported(a2: torch.Tensor, w_op: torch.Tensor, residual2, out: torch.Tensor, split_k) -> bool:
    """Whether `qgemm` may hand this call to the wgmma kernel: sm_90, int8 codes times int8 weights into a
    float output without residual, no split requested, at least one 64-row tile, and rows whose byte
    strides are 16-byte multiples (cp.async moves 16 bytes per thread)."""
    return (a2.is_cuda and torch.cuda.get_device_capability(a2.device) == (9, 0)
            and a2.dtype == torch.int8 and w_op.dtype == torch.int8 and residual2 is None
            and out.dtype in (torch.float32, torch.bfloat16, torch.float16) and (split_k or 1) == 1
            and a2.shape[0] >= 64 and a2.stride(1) == 1 and w_op.stride(1) == 1
            and a2.stride(0) % 16 == 0 and w_op.stride(0) % 16 == 0)


def qgemm_wgmma(a2, w_op, w_sum, w_scale, bias, scale, zero, group, group_stride: int, rows_per_sample: int,
                out: torch.Tensor) -> torch.Tensor:
    """`qgemm` for the calls `supported` accepts (same arguments, same result bit for bit)."""
    M, K = a2.shape
    N = w_op.shape[0]
    grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)
    _tuned[grid](a2, w_op, w_sum, w_scale, bias if bias is not None else w_scale, out, scale, zero, group,
                 M, N, K, rows_per_sample, group_stride, a2.stride(0), w_op.stride(0), out.stride(0),
                 HAS_BIAS=bias is not None)
    return out
