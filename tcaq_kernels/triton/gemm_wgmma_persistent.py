"""Persistent variant of the Gluon W8A8/W4A8 GEMM (`gemm_wgmma.py`): one program per SM walks its output
tiles, and the cp.async ring runs on across tile boundaries.

Why: on an H100 the Gluon GEMM kept its wgmma in flight and still only matched `tl.dot` (0.99× cuBLAS
bf16, SD-1.5 median). Most SD shapes have short K (320, 640, 1280: 3–10 steps of 128), so each output tile
pays a cold start (the ring's STAGES-1 steps loaded before the first MMA) and an epilogue during which no
load is in flight; at 8192×2560×320 the 41.8 µs it takes are almost three times its HBM floor. Here the
reduction steps of all the program's tiles form one sequence: the loads of the next tile's first steps
are issued while the current tile finishes and while its epilogue runs. Int8 codes only (float inputs
stay on `tl.dot`, see `gemm.WGMMA`), int8 or packed int4 weights, no split-K; the epilogue is
`gemm.linear_epilogue`, so the numbers are the other kernels' bit for bit.
"""
from __future__ import annotations

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.ampere import async_copy
from triton.experimental.gluon.language.nvidia.hopper import warpgroup_mma, warpgroup_mma_wait

from .gemm import linear_epilogue
from .gemm_wgmma import (CONFIGS, _copy_layout, _epilogue_tile, _instr_n, _int8_ring, _prune, _ready_w_operand,
                          _warps, smem_bytes, supported as wgmma_supported)
from .numerics import tuning_bench


@gluon.jit
def _load_step(a_smem, w_smem, a_ptr, w_ptr, rm0, ka, rn0, kw, j, total, num_k, num_m, pid, n_prog,
               M, N, K, KW, stride_am, stride_wn, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
               BLOCK_K: gl.constexpr, WK: gl.constexpr):
    """cp.async of step j of this program's sequence (its (j // num_k)-th tile, K step j % num_k) into one
    ring slot, as one commit group; zeros past M, N, K and past the sequence's end."""
    tile = pid + (j // num_k) * n_prog
    kk = j % num_k
    rm = (tile % num_m) * BLOCK_M + rm0
    rn = (tile // num_m) * BLOCK_N + rn0
    live = j < total
    a_ptrs = a_ptr + rm.to(gl.int64)[:, None] * stride_am + (kk * BLOCK_K + ka)[None, :]
    w_ptrs = w_ptr + rn.to(gl.int64)[:, None] * stride_wn + (kk * WK + kw)[None, :]
    a_mask = ((rm < M) & live)[:, None] & (ka < K - kk * BLOCK_K)[None, :]
    async_copy.async_copy_global_to_shared(a_smem, a_ptrs, mask=a_mask)
    async_copy.async_copy_global_to_shared(w_smem, w_ptrs, mask=((rn < N) & live)[:, None] & (kw < KW - kk * WK)[None, :])
    async_copy.commit_group()


@gluon.jit
def _persistent_kernel(
    a_ptr, w_ptr, w_sum_ptr, w_scale_ptr, bias_ptr, res_ptr, out_ptr,
    scale_ptr, zero_ptr, group_ptr, out_s_inv_ptr, out_zero_ptr, out_r_inv_ptr,
    M, N, K, KW, rows_per_sample, group_stride, stride_am, stride_wn, stride_rm, stride_rn, stride_om,
    W4: gl.constexpr, HAS_BIAS: gl.constexpr, HAS_RES: gl.constexpr,
    OUT_Q: gl.constexpr, OUT_HAS_RINV: gl.constexpr, OUT_QMIN: gl.constexpr, OUT_QMAX: gl.constexpr,
    BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, BLOCK_K: gl.constexpr, STAGES: gl.constexpr,
):
    num_warps: gl.constexpr = gl.num_warps()
    pid = gl.program_id(0)
    n_prog = gl.num_programs(0)
    num_m = (M + BLOCK_M - 1) // BLOCK_M
    num_tiles = num_m * ((N + BLOCK_N - 1) // BLOCK_N)
    num_k = (K + BLOCK_K - 1) // BLOCK_K
    total = ((num_tiles - pid + n_prog - 1) // n_prog) * num_k  # this program's steps, all its tiles

    WK: gl.constexpr = BLOCK_K // 2 if W4 else BLOCK_K
    a_copy: gl.constexpr = _copy_layout(BLOCK_M, BLOCK_K, 8, num_warps)
    w_copy: gl.constexpr = _copy_layout(BLOCK_N, WK, 8, num_warps)
    rm0 = gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, a_copy))
    ka = gl.arange(0, BLOCK_K, layout=gl.SliceLayout(0, a_copy))
    rn0 = gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, w_copy))
    kw = gl.arange(0, WK, layout=gl.SliceLayout(0, w_copy))
    a_smem, w_smem, w8_smem = _int8_ring(gl.int8, w_ptr.dtype.element_ty, W4, STAGES, BLOCK_M, BLOCK_N, BLOCK_K, WK)
    for p in gl.static_range(STAGES - 1):
        _load_step(a_smem.index(p), w_smem.index(p), a_ptr, w_ptr, rm0, ka, rn0, kw, p, total, num_k, num_m, pid,
                   n_prog, M, N, K, KW, stride_am, stride_wn, BLOCK_M, BLOCK_N, BLOCK_K, WK)

    mma_layout: gl.constexpr = gl.NVMMADistributedLayout(
        version=[3, 0], warps_per_cta=_warps(BLOCK_M, num_warps), instr_shape=[16, _instr_n(BLOCK_M, BLOCK_N, num_warps), 32])
    acc = gl.zeros((BLOCK_M, BLOCK_N), gl.int32, mma_layout)
    for i in range(total):
        s = i % STAGES
        kk = i % num_k
        w_op = _ready_w_operand(w_smem, w8_smem, s, i, w_copy, W4, True, STAGES, BLOCK_N, BLOCK_K)
        acc = warpgroup_mma(a_smem.index(s), w_op, acc, use_acc=kk > 0, is_async=True)  # a new tile starts from 0
        acc = warpgroup_mma_wait(num_outstanding=1, deps=(acc,))
        gl.thread_barrier()
        j = i + STAGES - 1  # possibly the next tile's first steps: they load during this tile's epilogue
        _load_step(a_smem.index(j % STAGES), w_smem.index(j % STAGES), a_ptr, w_ptr, rm0, ka, rn0, kw, j, total,
                   num_k, num_m, pid, n_prog, M, N, K, KW, stride_am, stride_wn, BLOCK_M, BLOCK_N, BLOCK_K, WK)
        if kk == num_k - 1:
            acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc,))
            tile = pid + (i // num_k) * n_prog
            y, em, en = _epilogue_tile(acc, (tile % num_m) * BLOCK_M, (tile // num_m) * BLOCK_N, BLOCK_M, BLOCK_N)
            g = gl.load(group_ptr + ((em % M) // rows_per_sample) * group_stride)
            linear_epilogue(y, em, en, M, N, gl.load(zero_ptr + g), g, w_sum_ptr, w_scale_ptr,
                            scale_ptr, bias_ptr, res_ptr, out_ptr, out_s_inv_ptr, out_zero_ptr, out_r_inv_ptr,
                            stride_rm, stride_rn, stride_om, HAS_BIAS, HAS_RES, OUT_Q, OUT_HAS_RINV, OUT_QMIN, OUT_QMAX)
    async_copy.wait_group(0)


def _prune_persistent(configs, named_args, **kwargs):
    """`gemm_wgmma`'s shared-memory prune with the int8 input this kernel takes."""
    return _prune(configs, named_args, A_FLOAT=False, **kwargs)


_tuned = triton.autotune(
    configs=[triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "STAGES": st}, num_warps=w)
             for bm, bn, bk, st, w in CONFIGS],
    key=["M", "N", "K", "W4", "HAS_RES", "OUT_Q"],
    prune_configs_by={"early_config_prune": _prune_persistent}, do_bench=tuning_bench,
)(_persistent_kernel)


def supported(a2: torch.Tensor, w_op: torch.Tensor, split_k: int) -> bool:
    """`gemm_wgmma.supported`, for int8 codes and no split only."""
    return a2.dtype == torch.int8 and split_k == 1 and wgmma_supported(a2, w_op)


def launch(a2, w_op, w_sum, w_scale, bias_arg, res, out, scale, zero, group, out_tables: tuple,
           rows_per_sample: int, group_stride: int, tail: dict) -> None:
    """The persistent kernel for an unsplit int8-code `qgemm` call (`tail`: qgemm's HAS_BIAS, HAS_RES and
    output-quantizer constexprs; its SPLIT_K is 1 here). As many programs as fit on the SMs at once (at most
    two per SM, by shared memory: the ring plus at most a whole int32 tile of epilogue scratch, which the
    compiler cannot place in the ring here since the ring stays live), fewer when there are fewer tiles."""
    M, K = a2.shape
    N = w_op.shape[0]
    props = torch.cuda.get_device_properties(a2.device)
    w4 = w_op.dtype == torch.uint8

    def grid(meta):
        config = triton.Config({k: meta[k] for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K", "STAGES")})
        scratch = meta["BLOCK_M"] * meta["BLOCK_N"] * 4
        per_sm = max(1, min(2, props.shared_memory_per_multiprocessor // (smem_bytes(config, 1, w4, False) + scratch)))
        tiles = triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"])
        return (min(tiles, per_sm * props.multi_processor_count),)

    _tuned[grid](
        a2, w_op, w_sum, w_scale, bias_arg, res, out, scale, zero, group, *out_tables,
        M, N, K, w_op.shape[1], rows_per_sample, group_stride, a2.stride(0), w_op.stride(0),
        res.stride(0), res.stride(1), out.stride(0), W4=w4, **{k: v for k, v in tail.items() if k != "SPLIT_K"},
    )
