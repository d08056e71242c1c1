"""Implicit-GEMM conv2d for Hopper in Gluon: `conv._qconv_kernel`'s algorithm with int8 wgmma kept in flight.

Why: the conv's `tl.dot` waits on every int8 wgmma like the GEMM's (see `gemm_wgmma.py`). This is the
same pipeline as that GEMM — a cp.async ring of STAGES buffers filled STAGES-1 reduction steps ahead,
each MMA issued asynchronously and only the previous one waited for — over `conv.py`'s reduction: steps
(filter tap, channel block) with channels fastest, the A tile gathered straight from NHWC codes (out-of-
image taps zero-filled by the masked copy), packed int4 weights widened in registers through a double
buffer. The epilogue is `conv.conv_epilogue` itself (padding read as z via the padding table of weight sums,
scales, bias, residual, float or next-layer codes), so the result is `_qconv_kernel`'s bit for bit.
Split-K as `conv.py` splits: each program of a split reduces its share of the steps into int32 partial
sums and `conv.qconv` finishes with the same split-K epilogue kernel.
"""
from __future__ import annotations

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.ampere import async_copy
from triton.experimental.gluon.language.nvidia.hopper import warpgroup_mma, warpgroup_mma_wait

from .conv import (conv_epilogue, even_channel_blocks, output_pixels, pixel_coords, table_clips, tap_inside,
                   tap_rows)
from .gemm_wgmma import _copy_layout, _epilogue_tile, _instr_n, _ready_w_operand, _store_partials, _warps
from .numerics import tuning_bench

#: (BLOCK_M, BLOCK_N, BLOCK_K, STAGES, num_warps); BLOCK_K 64 divides every SD/DDPM channel count
CONFIGS = [(128, 128, 64, 4, 8), (64, 128, 64, 4, 4), (128, 64, 64, 4, 4), (64, 64, 64, 4, 4),
           (128, 128, 128, 4, 8), (64, 128, 128, 4, 4)]


def _prune(configs, named_args, **kwargs):
    """Channel blocks that tile C exactly where one does (a 128 block over C = 320 would load half-empty
    tiles), else the smallest."""
    C = named_args["C"]
    exact = [c for c in configs if C % c.kwargs["BLOCK_K"] == 0]
    return exact or [c for c in configs if c.kwargs["BLOCK_K"] == 64]


@gluon.jit
def _int8_ring(a_smem_ty: gl.constexpr, w_ty: gl.constexpr, W4: gl.constexpr, STAGES: gl.constexpr,
               BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, BLOCK_K: gl.constexpr, WK: gl.constexpr):
    """The kernel's shared memory: the STAGES ring of A tiles and of weight tiles (WK bytes a row: packed
    int4 is half), and for int4 the two widened-weight buffers (for int8 weights the ring itself stands
    in, never read as such)."""
    a_smem = gl.allocate_shared_memory(a_smem_ty, [STAGES, BLOCK_M, BLOCK_K],
                                       gl.NVMMASharedLayout.get_default_for([BLOCK_M, BLOCK_K], a_smem_ty))
    w_smem = gl.allocate_shared_memory(w_ty, [STAGES, BLOCK_N, WK], gl.NVMMASharedLayout.get_default_for([BLOCK_N, WK], w_ty))
    if W4:
        w8_smem = gl.allocate_shared_memory(gl.int8, [2, BLOCK_N, BLOCK_K],
                                            gl.NVMMASharedLayout.get_default_for([BLOCK_N, BLOCK_K], gl.int8))
    else:
        w8_smem = w_smem
    return a_smem, w_smem, w8_smem


@gluon.jit
def _step_coords(it, c_blocks, KW: gl.constexpr, BLOCK_K: gl.constexpr):
    """(filter row, filter column, first channel) of reduction step `it` = (tap, channel block)."""
    tap = it // c_blocks
    return tap // KW, tap % KW, (it - tap * c_blocks) * BLOCK_K


@gluon.jit
def _next_step(di, dj, c0, C, KW: gl.constexpr, BLOCK_K: gl.constexpr):
    """`_step_coords` of the step after (di, dj, c0): the next channel block, else the tap after — a few
    uniform adds and compares where the step index's division by the channel blocks is ~25 instructions."""
    c0 = c0 + BLOCK_K
    wrap = (c0 >= C).to(gl.int32)
    c0 = c0 * (1 - wrap)
    dj = dj + wrap
    wrap = (dj == KW).to(gl.int32)
    return di + wrap, dj * (1 - wrap), c0


@gluon.jit
def _step_copies(x_rows, rows, cols, m_ok, ka, w_rows, n_ok, kw, di, dj, c0, live, H, W, C, CX, CW,
                 a_dst, w_dst, KH: gl.constexpr, KW: gl.constexpr, UP: gl.constexpr, BLOCK_K: gl.constexpr,
                 WK: gl.constexpr, MASKED: gl.constexpr, EVEN_C: gl.constexpr, EVEN_N: gl.constexpr):
    """cp.async of the reduction step at filter tap (di, dj), channels c0… of both operands, as one commit
    group; zeros for out-of-image taps and channels past C. A pixel holds CX codes, of which this range
    reads C from `x_rows` on. UP = 1: `x_rows` is at each row's top-left tap and `rows` / `cols` are
    `tap_rows`' inside masks; UP = 2: they are the top-left tap's input coordinates (ih0, iw0) of the H × W
    input stored as its (H/UP × W/UP) nearest-neighbour source. MASKED (the ring's first steps, which may lie
    past a short range: `live` false copies zeros): every mask. Else (the main loop's steps, all live) only
    what can be false — the taps' inside bits, channels where a block is partial (not EVEN_C), weight rows
    where N is (not EVEN_N); rows past M read real pixels (`pixel_coords` wraps them) that no store keeps —
    so with both whole the weight copies carry no predicate and the activation copies only the inside bits."""
    if UP == 1:
        inside = tap_inside(rows, cols, di, dj)
        a_ptrs = x_rows + ((di * W + dj) * CX + c0) + ka[None, :]
    else:
        ih = rows + di
        iw = cols + dj
        inside = (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
        a_ptrs = x_rows + (((ih // UP) * (W // UP) + iw // UP) * CX + c0)[:, None] + ka[None, :]
    w_ptrs = w_rows + (di * KW + dj) * CW + c0 * WK // BLOCK_K
    w_cols = kw < CW - c0 * WK // BLOCK_K
    if MASKED:
        inside = inside & m_ok & live
        async_copy.async_copy_global_to_shared(a_dst, a_ptrs, mask=inside[:, None] & (ka < C - c0)[None, :])
        async_copy.async_copy_global_to_shared(w_dst, w_ptrs, mask=(n_ok & live)[:, None] & w_cols[None, :])
    else:
        if EVEN_C:
            async_copy.async_copy_global_to_shared(a_dst, a_ptrs, mask=inside[:, None] & (ka >= 0)[None, :])
        else:
            async_copy.async_copy_global_to_shared(a_dst, a_ptrs, mask=inside[:, None] & (ka < C - c0)[None, :])
        if EVEN_C and EVEN_N:
            async_copy.async_copy_global_to_shared(w_dst, w_ptrs)
        else:
            async_copy.async_copy_global_to_shared(w_dst, w_ptrs, mask=n_ok[:, None] & w_cols[None, :])
    async_copy.commit_group()


@gluon.jit
def _mma_step(acc, a_smem, w_smem, w8_smem, i, w_copy: gl.constexpr, W4: gl.constexpr, STAGES: gl.constexpr,
              BLOCK_N: gl.constexpr, BLOCK_K: gl.constexpr):
    """Ring step i: wait for its copies, issue its MMA asynchronously and wait for the one before, whose
    buffers are then free in every warpgroup."""
    s = i % STAGES
    w_op = _ready_w_operand(w_smem, w8_smem, s, i, w_copy, W4, True, STAGES, BLOCK_N, BLOCK_K)
    acc = warpgroup_mma(a_smem.index(s), w_op, acc, is_async=True)
    acc = warpgroup_mma_wait(num_outstanding=1, deps=(acc,))
    gl.thread_barrier()
    return acc


@gluon.jit
def _reduce(acc, a_smem, w_smem, w8_smem, x_rows, rows, cols, m_ok, ka, w_rows, n_ok, kw, H, W, C, CX, CW,
            SPLIT_K: gl.constexpr, KH: gl.constexpr, KW: gl.constexpr, UP: gl.constexpr, W4: gl.constexpr,
            w_copy: gl.constexpr, STAGES: gl.constexpr, BLOCK_N: gl.constexpr, BLOCK_K: gl.constexpr,
            WK: gl.constexpr, EVEN_C: gl.constexpr, EVEN_N: gl.constexpr):
    """acc + Σ w·a over this program's reduction steps of one channel range, through the ring: STAGES-1
    steps copied ahead, each MMA issued asynchronously and only the previous one waited for; returns with
    every MMA and copy retired (so a second range may refill the ring). `x_rows`, `rows`, `cols`: as
    `_step_copies` takes them. The copied step's (di, dj, c0) is carried from step to step (`_next_step`)
    instead of divided out of its index, and the loop is split in two — steps that copy a live step ahead,
    with only the masks that can be false (`_step_copies`' MASKED false), then the ring's last STAGES-1
    steps, which copy nothing (an empty commit group keeps the waits' count) — so no step carries a predicate
    or a branch for the ring's tail. (Against one loop of masked copies and a division a step: 1.13× median
    on SD-1.5 b8, 1.07× on the embedded model at b256, H200, benchmarks/results/wgmma-variants-h200/.)"""
    c_blocks = (C + BLOCK_K - 1) // BLOCK_K
    n_iter = KH * KW * c_blocks
    if SPLIT_K > 1:  # split s runs steps [s·n/S, (s+1)·n/S), as `conv._qconv_kernel`'s splits do
        it_lo = gl.program_id(1) * n_iter // SPLIT_K
        it_hi = (gl.program_id(1) + 1) * n_iter // SPLIT_K
    else:
        it_lo = 0
        it_hi = n_iter
    n = it_hi - it_lo
    di, dj, c0 = _step_coords(it_lo, c_blocks, KW, BLOCK_K)
    for p in gl.static_range(STAGES - 1):  # masked: steps past a short range copy zeros
        if p > 0:
            di, dj, c0 = _next_step(di, dj, c0, C, KW, BLOCK_K)
        _step_copies(x_rows, rows, cols, m_ok, ka, w_rows, n_ok, kw, di, dj, c0, p < n, H, W, C, CX, CW,
                     a_smem.index(p), w_smem.index(p), KH, KW, UP, BLOCK_K, WK, True, EVEN_C, EVEN_N)
    n_copying = gl.maximum(n - (STAGES - 1), 0)
    for i in range(n_copying):
        acc = _mma_step(acc, a_smem, w_smem, w8_smem, i, w_copy, W4, STAGES, BLOCK_N, BLOCK_K)
        j = i + STAGES - 1
        di, dj, c0 = _next_step(di, dj, c0, C, KW, BLOCK_K)
        _step_copies(x_rows, rows, cols, m_ok, ka, w_rows, n_ok, kw, di, dj, c0, True, H, W, C, CX, CW,
                     a_smem.index(j % STAGES), w_smem.index(j % STAGES), KH, KW, UP, BLOCK_K, WK, False,
                     EVEN_C, EVEN_N)
    for i in range(n_copying, n):
        acc = _mma_step(acc, a_smem, w_smem, w8_smem, i, w_copy, W4, STAGES, BLOCK_N, BLOCK_K)
        async_copy.commit_group()
    acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc,))
    async_copy.wait_group(0)
    gl.thread_barrier()  # the last MMAs' buffers are free in every warpgroup
    return acc


@gluon.jit
def _qconv_wgmma_kernel(
    x_ptr, w_ptr, w_pad_sum_ptr, w_scale_ptr, bias_ptr, res_ptr, out_ptr, part_ptr,
    scale_ptr, zero_ptr, group_ptr, out_s_inv_ptr, out_zero_ptr, out_r_inv_ptr,
    w2_ptr, w2_pad_sum_ptr, scale2_ptr, zero2_ptr,
    B, H, W, C, CW, C2, CW2, N, OH, OW, pad_h, pad_w, clip_b, clip_l, clip_r, group_stride,
    stride_wn, stride_w2n, stride_rb, stride_rc, stride_rh, stride_rw,
    KH: gl.constexpr, KW: gl.constexpr, STRIDE: gl.constexpr, UP: gl.constexpr, PADDED: gl.constexpr,
    W4: gl.constexpr,
    SPLIT_K: gl.constexpr, HAS_BIAS: gl.constexpr, HAS_RES: gl.constexpr, TWO_Q: gl.constexpr,
    OUT_Q: gl.constexpr, OUT_HAS_RINV: gl.constexpr, OUT_QMIN: gl.constexpr, OUT_QMAX: gl.constexpr,
    EVEN_C: gl.constexpr, EVEN_N: gl.constexpr,
    BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, BLOCK_K: gl.constexpr, STAGES: gl.constexpr,
):
    num_warps: gl.constexpr = gl.num_warps()
    M = B * OH * OW
    num_m = (M + BLOCK_M - 1) // BLOCK_M
    pid = gl.program_id(0)
    off_m = (pid % num_m) * BLOCK_M  # neighbouring programs share a weight tile while it is in L2
    off_n = (pid // num_m) * BLOCK_N

    WK: gl.constexpr = BLOCK_K // 2 if W4 else BLOCK_K  # weight bytes per row and step (CW: per tap row)
    a_copy: gl.constexpr = _copy_layout(BLOCK_M, BLOCK_K, 8, num_warps)
    w_copy: gl.constexpr = _copy_layout(BLOCK_N, WK, 8, num_warps)
    rm = off_m + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, a_copy))
    ka = gl.arange(0, BLOCK_K, layout=gl.SliceLayout(0, a_copy))
    rn = off_n + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, w_copy))
    kw = gl.arange(0, WK, layout=gl.SliceLayout(0, w_copy))
    b, oh, ow = pixel_coords(rm, M, OH, OW)  # the gather needs coordinates; groups only the epilogue
    ih0 = oh * STRIDE - pad_h
    iw0 = ow * STRIDE - pad_w
    CX = C + C2  # a pixel's codes: the first range's C channels, then the second's C2 (0 without one)
    x_rows = x_ptr + (b.to(gl.int64) * (H // UP) * (W // UP) * CX)[:, None]  # the stored (H/UP × W/UP) image
    x_rows, rows, cols = tap_rows(x_rows, ih0, iw0, H, W, CX, KH, KW, UP)  # once for both channel ranges
    m_ok = rm < M
    n_ok = rn < N

    a_smem, w_smem, w8_smem = _int8_ring(gl.int8, w_ptr.dtype.element_ty, W4, STAGES, BLOCK_M, BLOCK_N, BLOCK_K, WK)
    mma_layout: gl.constexpr = gl.NVMMADistributedLayout(
        version=[3, 0], warps_per_cta=_warps(BLOCK_M, num_warps), instr_shape=[16, _instr_n(BLOCK_M, BLOCK_N, num_warps), 32])
    acc = _reduce(gl.zeros((BLOCK_M, BLOCK_N), gl.int32, mma_layout), a_smem, w_smem, w8_smem, x_rows, rows, cols,
                  m_ok, ka, w_ptr + rn.to(gl.int64)[:, None] * stride_wn + kw[None, :], n_ok, kw, H, W, C, CX, CW,
                  SPLIT_K, KH, KW, UP, W4, w_copy, STAGES, BLOCK_N, BLOCK_K, WK, EVEN_C, EVEN_N)
    # channels_last output: rows of N contiguous
    acc, em, en = _epilogue_tile(acc, off_m, off_n, BLOCK_M, BLOCK_N)
    if SPLIT_K > 1:
        _store_partials(part_ptr, acc, em, en, M, N)
        return
    eb, eoh, eow, eg, ezero = output_pixels(em, M, OH, OW, group_ptr, group_stride, zero_ptr)
    if TWO_Q:  # the second range: its own codes (channels C…CX of each pixel) and weights, its own sum
        acc2 = _reduce(gl.zeros((BLOCK_M, BLOCK_N), gl.int32, mma_layout), a_smem, w_smem, w8_smem, x_rows + C,
                       rows, cols, m_ok, ka, w2_ptr + rn.to(gl.int64)[:, None] * stride_w2n + kw[None, :], n_ok, kw,
                       H, W, C2, CX, CW2, SPLIT_K, KH, KW, UP, W4, w_copy, STAGES, BLOCK_N, BLOCK_K, WK, EVEN_C, EVEN_N)
        acc2, _, _ = _epilogue_tile(acc2, off_m, off_n, BLOCK_M, BLOCK_N)
        ezero2 = gl.load(zero2_ptr + eg)
    else:
        acc2, ezero2 = acc, ezero
    conv_epilogue(acc, em, en, eb, eoh, eow, eoh * STRIDE - pad_h, eow * STRIDE - pad_w, ezero, eg, M, N, H, W,
                  clip_b, clip_l, clip_r,
                  w_pad_sum_ptr, w_scale_ptr, scale_ptr, bias_ptr, res_ptr, out_ptr,
                  out_s_inv_ptr, out_zero_ptr, out_r_inv_ptr, stride_rb, stride_rc, stride_rh, stride_rw,
                  KH, KW, PADDED, HAS_BIAS, HAS_RES, OUT_Q, OUT_HAS_RINV, OUT_QMIN, OUT_QMAX,
                  acc2, ezero2, w2_pad_sum_ptr, scale2_ptr, TWO_Q)


_tuned = triton.autotune(
    configs=[triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "STAGES": st}, num_warps=w)
             for bm, bn, bk, st, w in CONFIGS],
    key=["B", "H", "W", "C", "C2", "N", "OH", "OW", "KH", "KW", "STRIDE", "UP", "PADDED", "W4", "SPLIT_K", "HAS_RES",
         "OUT_Q"],
    prune_configs_by={"early_config_prune": _prune}, do_bench=tuning_bench,
)(triton.heuristics({"EVEN_C": even_channel_blocks, "EVEN_N": lambda a: a["N"] % a["BLOCK_N"] == 0})(
    _qconv_wgmma_kernel))


def supported(x_nhwc: torch.Tensor, w_op: torch.Tensor, M: int, C: int, w_op2: torch.Tensor) -> bool:
    """Whether `qconv` may hand this call to the wgmma kernel: sm_90, at least one 64-pixel tile,
    contiguous NHWC codes and weight rows whose 16-byte copies stay aligned (each range's C — the first
    range's, `C` of the codes' channels, and the rest — and its packed ⌈C/2⌉ bytes multiples of 16;
    `w_op2` is `w_op` without a second range)."""
    return (x_nhwc.is_cuda and torch.cuda.get_device_capability(x_nhwc.device) == (9, 0)
            and M >= 64 and x_nhwc.is_contiguous() and w_op.is_contiguous() and w_op2.is_contiguous()
            and C % 16 == 0 and x_nhwc.shape[3] % 16 == 0 and w_op.shape[3] % 16 == 0 and w_op2.shape[3] % 16 == 0)


def launch(x_nhwc, w_op, w_pad_sum, w_scale, bias_arg, res, out, part, scale, zero, group, out_tables: tuple,
           group_stride: int, padding, tail: dict, second: tuple, C: int, H: int, W: int) -> None:
    """The wgmma kernel in `conv.qconv`'s place, same arguments (`tail`: qconv's KH, KW, STRIDE, UP, SPLIT_K,
    TWO_Q, HAS_BIAS, HAS_RES and output-quantizer constexprs; `second`: the second channel range's
    (weights, padding table, scale, zero) — the first range's again without TWO_Q —, `C` the first range's
    channels, H × W the input the conv sees, UP times the codes' own). With SPLIT_K > 1 it writes int32
    partial sums to `part` and `qconv` runs its split-K epilogue kernel after it, as for its own kernel."""
    B, CX = x_nhwc.shape[0], x_nhwc.shape[3]
    N, CW = w_op.shape[0], w_op.shape[3]
    w_op2, w_pad_sum2, scale2, zero2 = second
    OH, OW = out.shape[2], out.shape[3]
    M = B * OH * OW
    grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]), tail["SPLIT_K"])
    _tuned[grid](
        x_nhwc, w_op, w_pad_sum, w_scale, bias_arg, res, out, part, scale, zero, group, *out_tables,
        w_op2, w_pad_sum2, scale2, zero2,
        B, H, W, C, CW, CX - C, w_op2.shape[3], N, OH, OW, padding[0], padding[2], *table_clips(w_pad_sum), group_stride,
        w_op.stride(0), w_op2.stride(0), res.stride(0), res.stride(1), res.stride(2), res.stride(3),
        W4=w_op.dtype == torch.uint8, **tail,
    )
