"""Implicit-GEMM conv2d on NHWC int8 codes, with the GEMM's epilogue (DESIGN.md §3).

Rows are output pixels m = (b, oh, ow), columns output channels n, and the reduction runs over
(r, s, c) with c fastest, so each A tile is BLOCK_M pixels × BLOCK_K contiguous input channels of
one filter tap — coalesced NHWC loads, no im2col buffer. The taps and channel blocks are flattened
into one loop so that the software pipeline spans the whole reduction, not one tap. A step's gather
needs, per output row, only its top-left tap's offset and which filter rows and columns are inside the
image: `tap_rows` computes them once, a step adds a uniform offset and tests two bits (Gluon main loop
177 → 145 sm_90a instructions a step; H200 29 Nov: the Gluon convs 1.03× (embedded b256) / 1.05×
(SD-1.5 b8) faster, median). Convs of a few input channels (an image's 3, a latent's 4) flatten (tap,
channel) into the K tile instead (`PACK_TAPS_K`).

Padding is in the quantized domain with the code z[g] (DESIGN.md §3). The main loop reads
out-of-image taps as 0 (zero-filled async copies: the A tile goes to the MMA straight from shared
memory), and the epilogue subtracts z·Σ w over the taps inside the image only: `Σ w·(a − z)` with the
padding read as z, the reference's accumulator. Which taps are inside depends only on how many filter
rows a pixel loses at the top and bottom and columns at the left and right, so `prepare_conv_weight`
tabulates Σ w over the kept taps for every such clipping the padding allows ([pt+1, pb+1, pl+1, pr+1, N]
int32) and the epilogue reads one table row per pixel: one integer multiply-add per output. (Summing
per-tap sums tap by tap in the epilogue cost more instructions than a 64-channel conv's main loop; on an
H200 the table made the 3×3 convs 1.08× (SD-1.5) / 1.18× (embedded model) faster, median, up to 1.5×:
benchmarks/results/conv-padding-table-h200/.)
Channel counts that are not tile multiples (C_in = 3, 4, 960, …) are masked, not rejected; the
masked lanes meet zero weights.

Weights come from `prepare_conv_weight`: [N, KH, KW, C] int8 (C contiguous, K-major for wgmma), or
packed int4 [N, KH, KW, ⌈C/2⌉] (Hopper has no 4-bit MMA): widened to int8 by `widen.py` ahead of the
int8 kernel by default, in registers with TCAQ_W4_WIDEN=0.

Split-K: the deep, small layers (SD's 8×8 and 16×16 levels at batch 2: M = 128–512 pixels, K up to
9·2560) give far fewer output tiles than SMs. The reduction steps (tap, channel block) are then
divided among `split_k` programs per tile, each writing its int32 partial sums to a workspace
[split_k, M, N]; a second kernel adds them in split order and runs the same epilogue
(`conv_epilogue`) as the unsplit kernel. Integer addition makes the result bit-exact whatever the
split, the fixed order makes it deterministic, and no decision reads device data, so CUDA graphs
capture it. The split count comes from the GEMM's `choose_split_k` over K = KH·KW·C.

Split input (`TWO_Q`): a UNet up block's conv reads cat([h, skip]) quantized with one activation
quantizer per channel range (quant/state.py `input_split`). The codes of both ranges sit in one NHWC
tensor (C + C2 channels a pixel); the reduction runs once over the first range's C channels with its
weights and once over the other C2 with theirs, each into its own int32 sum, and the epilogue corrects
each for its own zero point and combines acc·(s_w·s_a) + acc2·(s_w·s_a2) before the bias — the order
of ops/reference.py's `epilogue`. No split-K with it.

Quantized output (`OUT_Q`, as in gemm.py): instead of y, the epilogue can store the next layer's
int8 activation codes of the fp32 y (bias and residual added), `quantize_uniform` with that layer's
s_inv[g], z[g] and r_inv[n]. They come NHWC [B, OH, OW, N] — the input layout of the next conv —
so a conv feeding a conv hands over one byte per value and skips the separate quantize pass.
"""
import itertools

import torch
import triton
import triton.language as tl

from ..quant.primitives import pack_int4
from . import gemm
from . import widen
from .gemm import AUTO_SPLIT_K, choose_split_k, output_quantizer
from .numerics import grouped_tile, interpreting, quantize_output, quick_tuning, tuning_bench, unpack_int4_rows


def _configs():
    if interpreting():
        return [triton.Config({"BLOCK_M": 32, "BLOCK_N": 16, "BLOCK_K": 64, "GROUP_M": 4}, num_warps=4)]
    cfg = lambda bm, bn, bk, w, s: triton.Config(
        {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8}, num_warps=w, num_stages=s)
    wide = [cfg(128, 128, 64, 4, 4), cfg(128, 256, 64, 8, 3), cfg(128, 128, 128, 8, 3),
            cfg(128, 64, 64, 4, 4), cfg(64, 128, 64, 4, 4), cfg(64, 64, 64, 4, 4)]
    # C_in = 3 / 4 (image, latent): the int8 MMA's minimum K tile
    narrow = [cfg(64, 64, 32, 4, 4), cfg(128, 64, 32, 4, 4)]
    return [wide[0], narrow[0]] if quick_tuning() else wide + narrow


def _prune(configs, named_args, **kwargs):
    """BLOCK_K never much past C (C_in = 3/4 gets 32-channel tiles, the int8 MMA's minimum) — past the whole
    KH·KW·C reduction with PACK_TAPS."""
    C = named_args["C"] * (kwargs["KH"] * kwargs["KW"] if kwargs.get("PACK_TAPS") else 1)  # PACK_TAPS: 0 or C
    fit = [c for c in configs if c.kwargs["BLOCK_K"] <= max(32, triton.next_power_of_2(C))]
    return fit or configs


def even_channel_blocks(args: dict) -> bool:
    """The conv kernels' EVEN_C heuristic: every channel block of both ranges full (C and C2 multiples of
    BLOCK_K), so the copies need no channel mask."""
    return args["C"] % args["BLOCK_K"] == 0 and args["C2"] % args["BLOCK_K"] == 0


@triton.autotune(configs=_configs(),
                 key=["B", "H", "W", "C", "C2", "N", "OH", "OW", "KH", "KW", "STRIDE", "UP", "PADDED", "W4", "SPLIT_K",
                      "OUT_Q", "PACK_TAPS"],
                 prune_configs_by={"early_config_prune": _prune}, do_bench=tuning_bench)
@triton.heuristics({"EVEN_C": even_channel_blocks})
@triton.jit
def _qconv_kernel(
    x_ptr, w_ptr, w_pad_sum_ptr, w_scale_ptr, bias_ptr, res_ptr, out_ptr, part_ptr,
    scale_ptr, zero_ptr, group_ptr, out_s_inv_ptr, out_zero_ptr, out_r_inv_ptr,
    w2_ptr, w2_pad_sum_ptr, scale2_ptr, zero2_ptr,
    B, H, W, C, C2, N, OH, OW, pad_h, pad_w, clip_b, clip_l, clip_r, group_stride,
    stride_wn, stride_w2n, stride_rb, stride_rc, stride_rh, stride_rw,
    KH: tl.constexpr, KW: tl.constexpr, STRIDE: tl.constexpr, UP: tl.constexpr, PADDED: tl.constexpr,
    W4: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr, SPLIT_K: tl.constexpr, TWO_Q: tl.constexpr,
    OUT_Q: tl.constexpr, OUT_HAS_RINV: tl.constexpr, OUT_QMIN: tl.constexpr, OUT_QMAX: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    EVEN_C: tl.constexpr, PACK_TAPS: tl.constexpr,
):
    M = B * OH * OW
    pid_m, pid_n = grouped_tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)

    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rn_in = rn % N
    b, oh, ow, g, zero = output_pixels(rm, M, OH, OW, group_ptr, group_stride, zero_ptr)
    ih0 = oh * STRIDE - pad_h
    iw0 = ow * STRIDE - pad_w
    CX = C + C2  # a pixel's codes: the first range's C channels, then the second's C2 (0 without one)
    x_rows = x_ptr + (b.to(tl.int64) * (H // UP) * (W // UP) * CX)[:, None]  # the stored (H/UP × W/UP) image
    if PACK_TAPS:  # = C: int8 weights, one channel range, no split (the launcher's condition)
        acc = _reduce_packed_taps(x_rows, ih0, iw0, w_ptr, rn_in, stride_wn, H, W, CX, KH, KW, UP, PACK_TAPS,
                                  BLOCK_M, BLOCK_N, BLOCK_K)
    else:
        x_rows, rows, cols = tap_rows(x_rows, ih0, iw0, H, W, CX, KH, KW, UP)
        acc = _reduce(x_rows, rows, cols, w_ptr, rn_in, stride_wn, H, W, C, CX, KH, KW, UP, W4, SPLIT_K,
                      BLOCK_M, BLOCK_N, BLOCK_K, EVEN_C)
    if TWO_Q:  # the second range: its own codes (channels C…CX of each pixel) and weights
        acc2 = _reduce(x_rows + C, rows, cols, w2_ptr, rn_in, stride_w2n, H, W, C2, CX, KH, KW, UP, W4, SPLIT_K,
                       BLOCK_M, BLOCK_N, BLOCK_K, EVEN_C)
        zero2 = tl.load(zero2_ptr + g)
    else:
        acc2, zero2 = acc, zero

    if SPLIT_K > 1:
        # int32 partial sums; `_splitk_conv_epilogue_kernel` adds them in split order and finishes
        part = part_ptr + tl.program_id(1).to(tl.int64) * M * N + rm[:, None].to(tl.int64) * N + rn[None, :]
        tl.store(part, acc, mask=(rm < M)[:, None] & (rn < N)[None, :])
    else:
        conv_epilogue(acc, rm, rn, b, oh, ow, ih0, iw0, zero, g, M, N, H, W, clip_b, clip_l, clip_r,
                      w_pad_sum_ptr, w_scale_ptr, scale_ptr, bias_ptr, res_ptr, out_ptr,
                      out_s_inv_ptr, out_zero_ptr, out_r_inv_ptr, stride_rb, stride_rc, stride_rh, stride_rw,
                      KH, KW, PADDED, HAS_BIAS, HAS_RES, OUT_Q, OUT_HAS_RINV, OUT_QMIN, OUT_QMAX,
                      acc2, zero2, w2_pad_sum_ptr, scale2_ptr, TWO_Q)


@triton.jit
def _reduce(x_rows, rows, cols, w_ptr, rn_in, stride_wn, H, W, C, CX, KH: tl.constexpr, KW: tl.constexpr,
            UP: tl.constexpr, W4: tl.constexpr, SPLIT_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
            BLOCK_K: tl.constexpr, EVEN_C: tl.constexpr):
    """Σ w·a over this program's reduction steps (tap, channel block) of one channel range: C channels
    starting at `x_rows` in pixels of CX codes, weights [N, KH, KW, C] (packed: ⌈C/2⌉ bytes a tap).
    UP = 1: `x_rows` is at each row's top-left tap and `rows` / `cols` are `tap_rows`' inside masks;
    UP = 2: they are the top-left tap's coordinates (ih0, iw0) in the H × W input, stored as its
    (H/UP × W/UP) nearest-neighbour source: pixel (ih, iw) reads (ih // UP, iw // UP)."""
    rk = tl.arange(0, BLOCK_K)
    c_blocks = (C + BLOCK_K - 1) // BLOCK_K
    n_iter = KH * KW * c_blocks
    if SPLIT_K > 1:  # split s runs steps [s·n/S, (s+1)·n/S): balanced, and none empty while S ≤ n
        it_lo = tl.program_id(1) * n_iter // SPLIT_K
        it_hi = (tl.program_id(1) + 1) * n_iter // SPLIT_K
    else:  # constant bounds: the unsplit kernel compiles as it did before split-K existed
        it_lo = 0
        it_hi = n_iter
    if W4:
        c_w = (C + 1) // 2
        rkw = tl.arange(0, BLOCK_K // 2)
        w_rows = w_ptr + rn_in[:, None].to(tl.int64) * stride_wn + rkw[None, :]
        if SPLIT_K > 1:
            p_next = _packed_weight_tile(w_rows, it_lo, it_hi, c_blocks, c_w, rkw, BLOCK_K)
        else:
            p_next = tl.load(w_rows, mask=(rkw < c_w)[None, :], other=0)
    else:
        w_rows = w_ptr + rn_in[:, None].to(tl.int64) * stride_wn + rk[None, :]

    acc = tl.full((BLOCK_M, BLOCK_N), 0, tl.int32)
    for it in range(it_lo, it_hi):
        tap = it // c_blocks
        c0 = (it - tap * c_blocks) * BLOCK_K
        # Out-of-image taps read 0 here (a zero-filled async copy, so the tile stays in shared
        # memory for the MMA); the epilogue turns them into the padding code z.
        if UP == 1:
            inside = tap_inside(rows, cols, tap // KW, tap % KW)
            a_ptrs = x_rows + ((tap // KW * W + tap % KW) * CX + c0) + rk[None, :]
        else:
            ih = rows + tap // KW
            iw = cols + tap % KW
            inside = (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
            a_ptrs = x_rows + (((ih // UP) * (W // UP) + iw // UP) * CX + c0)[:, None] + rk[None, :]
        if EVEN_C:
            a = tl.load(a_ptrs, mask=inside[:, None], other=0)
        else:
            a = tl.load(a_ptrs, mask=inside[:, None] & (rk < C - c0)[None, :], other=0)
        if W4:
            # int4 weights are widened in registers, which Triton does not pipeline: prefetch the
            # next tile by hand, one iteration ahead.
            w = unpack_int4_rows(p_next, BLOCK_N, BLOCK_K)
            p_next = _packed_weight_tile(w_rows, it + 1, it_hi, c_blocks, c_w, rkw, BLOCK_K)
        else:
            w_ptrs = w_rows + tap * C + c0
            if EVEN_C:
                w = tl.load(w_ptrs)
            else:
                w = tl.load(w_ptrs, mask=(rk < C - c0)[None, :], other=0)
        acc = tl.dot(a, tl.trans(w), acc, out_dtype=tl.int32)
    return acc


@triton.jit
def pixel_coords(rm, M, OH, OW):
    """(b, oh, ow) of output rows `rm`, wrapped into [0, M) so every load they index stays in bounds
    (stores are masked)."""
    rm_in = rm % M
    return rm_in // (OW * OH), (rm_in // OW) % OH, rm_in % OW


@triton.jit
def output_pixels(rm, M, OH, OW, group_ptr, group_stride, zero_ptr):
    """(b, oh, ow, g, z) of output rows `rm`: `pixel_coords`, timestep group and zero point."""
    b, oh, ow = pixel_coords(rm, M, OH, OW)
    g = tl.load(group_ptr + b * group_stride)
    return b, oh, ow, g, tl.load(zero_ptr + g)


@triton.jit
def tap_rows(x_rows, ih0, iw0, H, W, CX, KH: tl.constexpr, KW: tl.constexpr, UP: tl.constexpr):
    """What every reduction step needs of each output row, computed once: (x_rows, rows, cols) as both conv
    kernels' main loops take them. UP = 1: `x_rows` moved to the row's top-left tap, pixel (ih0, iw0) of CX
    codes (outside the image for border rows — only masked loads use it), and bit masks of its filter rows
    (bit i: input row ih0 + i inside) and columns inside the image: a step then adds one uniform offset and
    tests two bits (`tap_inside`). UP = 2 (an upsampled input, whose coordinates a step divides by UP):
    `x_rows` and the top-left coordinates (ih0, iw0) as they are."""
    if UP == 1:
        rows = ih0 * 0
        cols = iw0 * 0
        for i in tl.static_range(KH):
            rows = rows | (((ih0 + i >= 0) & (ih0 + i < H)).to(tl.int32) << i)
        for j in tl.static_range(KW):
            cols = cols | (((iw0 + j >= 0) & (iw0 + j < W)).to(tl.int32) << j)
        x_rows = x_rows + ((ih0 * W + iw0) * CX)[:, None]
    else:
        rows = ih0
        cols = iw0
    return x_rows, rows, cols


@triton.jit
def tap_inside(rows_in, cols_in, di, dj):
    """Whether filter tap (di, dj) of each row reads inside the image, from `tap_rows`' masks."""
    return ((rows_in >> di) & (cols_in >> dj) & 1) != 0


@triton.jit
def _reduce_packed_taps(x_rows, ih0, iw0, w_ptr, rn_in, stride_wn, H, W, CX, KH: tl.constexpr, KW: tl.constexpr,
                        UP: tl.constexpr, C: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                        BLOCK_K: tl.constexpr):
    """`_reduce` for a few input channels (an image's 3, a latent's 4): the reduction runs over k = (tap, c)
    flattened, BLOCK_K of them a step, so 3×3 × 3 channels is one 32-wide step instead of nine steps of
    which 3 / 32 are channels. The A tile is gathered code by code (pixel (ih0 + i, iw0 + j), channel c
    for k = (i·KW + j)·C + c; out-of-image taps read 0, as `_reduce`'s); int8 weights [N, KH, KW, C] are
    that very k order, contiguous (stride_wn = KH·KW·C). C is a compile-time constant here, so that the
    (tap, channel) of each k is a multiply and shift, not a division."""
    rk = tl.arange(0, BLOCK_K)
    K = KH * KW * C
    w_rows = w_ptr + rn_in[:, None].to(tl.int64) * stride_wn + rk[None, :]
    acc = tl.full((BLOCK_M, BLOCK_N), 0, tl.int32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + rk
        tap = k // C
        ih = ih0[:, None] + (tap // KW)[None, :]
        iw = iw0[:, None] + (tap % KW)[None, :]
        ok = (k < K)[None, :] & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
        a = tl.load(x_rows + ((ih // UP) * (W // UP) + iw // UP) * CX + (k - tap * C)[None, :], mask=ok, other=0)
        w = tl.load(w_rows + k0, mask=(k < K)[None, :], other=0)
        acc = tl.dot(a, tl.trans(w), acc, out_dtype=tl.int32)
    return acc


@triton.jit
def _packed_weight_tile(w_rows, it, it_end, c_blocks, c_w, rkw, BLOCK_K: tl.constexpr):
    """Packed int4 weight tile [BLOCK_N, BLOCK_K/2] of reduction step `it` (tap, channel block);
    zeros from step `it_end` on, so the one-ahead prefetch never reads past the program's range."""
    tap = it // c_blocks
    c0 = (it - tap * c_blocks) * BLOCK_K
    return tl.load(w_rows + tap * c_w + c0 // 2, mask=(rkw < c_w - c0 // 2)[None, :] & (it < it_end), other=0)


@triton.jit
def conv_epilogue(acc, rm, rn, b, oh, ow, ih0, iw0, zero, g, M, N, H, W, clip_b, clip_l, clip_r,
                  w_pad_sum_ptr, w_scale_ptr, scale_ptr, bias_ptr, res_ptr, out_ptr,
                  out_s_inv_ptr, out_zero_ptr, out_r_inv_ptr, stride_rb, stride_rc, stride_rh, stride_rw,
                  KH: tl.constexpr, KW: tl.constexpr, PADDED: tl.constexpr, HAS_BIAS: tl.constexpr,
                  HAS_RES: tl.constexpr,
                  OUT_Q: tl.constexpr, OUT_HAS_RINV: tl.constexpr, OUT_QMIN: tl.constexpr, OUT_QMAX: tl.constexpr,
                  acc2, zero2, w2_pad_sum_ptr, scale2_ptr, TWO_Q: tl.constexpr):
    """Zero point and padding correction in int32, then acc·(s_w·s_a) + bias (+ residual) in fp32
    (scale formed first), stored to out[rm, rn] (NHWC rows = output pixels) — or, with OUT_Q, its
    int8 codes for the next layer (`quantize_output`).

    `acc` is Σ w·a with out-of-image taps read as 0; `ih0`/`iw0` are the rows' top-left input
    coordinates, `zero`/`g` their zero points and timestep groups; `w_pad_sum_ptr` a `prepare_conv_weight`
    table of at least the call's padding (`clip_*`: its extents less one, as `_clip_pattern`). With TWO_Q,
    `acc2` is the second channel range's sum (its zero points `zero2`, table and scales), added as ops/reference.py's
    `epilogue` adds it: acc·(s_w·s_a) + acc2·(s_w·s_a2), then the bias. Shared by the unsplit kernels
    and the split-K reduction, so all round the same way.
    """
    n_mask = rn < N
    clip = _clip_pattern(ih0, iw0, H, W, clip_b, clip_l, clip_r, KH, KW)
    acc = _padding_corrected(acc, zero, w_pad_sum_ptr, clip, rn, n_mask, N, PADDED)
    s_w = tl.load(w_scale_ptr + rn, mask=n_mask, other=0.0)[None, :]
    y = acc.to(tl.float32) * (s_w * tl.load(scale_ptr + g)[:, None])
    if TWO_Q:
        acc2 = _padding_corrected(acc2, zero2, w2_pad_sum_ptr, clip, rn, n_mask, N, PADDED)
        y = y + acc2.to(tl.float32) * (s_w * tl.load(scale2_ptr + g)[:, None])
    if HAS_BIAS:
        y = y + tl.load(bias_ptr + rn, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    mask = (rm < M)[:, None] & n_mask[None, :]
    if HAS_RES:
        r_off = b.to(tl.int64) * stride_rb + oh * stride_rh + ow * stride_rw
        res = tl.load(res_ptr + r_off[:, None] + rn[None, :].to(tl.int64) * stride_rc, mask=mask)
        y = y + res.to(tl.float32)
    if OUT_Q:
        y = quantize_output(y, rn, n_mask, g, out_s_inv_ptr, out_zero_ptr, out_r_inv_ptr,
                            OUT_HAS_RINV, OUT_QMIN, OUT_QMAX)
    out_ptrs = out_ptr + rm[:, None].to(tl.int64) * N + rn[None, :]
    tl.store(out_ptrs, y.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _clip_pattern(ih0, iw0, H, W, clip_b, clip_l, clip_r, KH: tl.constexpr, KW: tl.constexpr):
    """Per output row, its row of the padding table: the filter rows lost at the top (a) and bottom (b) and
    columns at the left (c) and right (d) — at most the padding's, so within a table [·, clip_b + 1,
    clip_l + 1, clip_r + 1] prepared for at least that padding — as a flat index."""
    a = tl.maximum(-ih0, 0)
    b = tl.maximum(ih0 + KH - H, 0)
    c = tl.maximum(-iw0, 0)
    d = tl.maximum(iw0 + KW - W, 0)
    return ((a * (clip_b + 1) + b) * (clip_l + 1) + c) * (clip_r + 1) + d


@triton.jit
def _padding_corrected(acc, zero, w_pad_sum_ptr, clip, rn, n_mask, N, PADDED: tl.constexpr):
    """acc − z·Σ_{taps inside the image} w  =  Σ w·(a − z) with the padding read as z (DESIGN.md §3): the
    sums of the row's clipping pattern `clip` (one table row, contiguous over n), one multiply-add each.
    Without padding every pixel keeps every tap: the table's one row, loaded once for all rows."""
    if PADDED:
        sums = tl.load(w_pad_sum_ptr + clip[:, None] * N + rn[None, :], mask=n_mask[None, :], other=0)
    else:
        sums = tl.load(w_pad_sum_ptr + rn, mask=n_mask, other=0)[None, :]
    return acc - zero[:, None] * sums


@triton.jit
def _splitk_conv_epilogue_kernel(
    part_ptr, w_pad_sum_ptr, w_scale_ptr, bias_ptr, res_ptr, out_ptr, scale_ptr, zero_ptr, group_ptr,
    out_s_inv_ptr, out_zero_ptr, out_r_inv_ptr,
    H, W, N, OH, OW, M, pad_h, pad_w, clip_b, clip_l, clip_r, group_stride, stride_rb, stride_rc, stride_rh, stride_rw,
    KH: tl.constexpr, KW: tl.constexpr, STRIDE: tl.constexpr, PADDED: tl.constexpr, SPLIT_K: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr,
    OUT_Q: tl.constexpr, OUT_HAS_RINV: tl.constexpr, OUT_QMIN: tl.constexpr, OUT_QMAX: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    b, oh, ow, g, zero = output_pixels(rm, M, OH, OW, group_ptr, group_stride, zero_ptr)
    mask = (rm < M)[:, None] & (rn < N)[None, :]
    part = part_ptr + rm[:, None].to(tl.int64) * N + rn[None, :]
    acc = tl.full((BLOCK_M, BLOCK_N), 0, tl.int32)
    for _ in range(0, SPLIT_K):  # in split order: deterministic (and integer, so exact)
        acc += tl.load(part, mask=mask, other=0)
        part += M * N
    conv_epilogue(acc, rm, rn, b, oh, ow, oh * STRIDE - pad_h, ow * STRIDE - pad_w, zero, g, M, N, H, W,
                  clip_b, clip_l, clip_r, w_pad_sum_ptr, w_scale_ptr, scale_ptr, bias_ptr, res_ptr, out_ptr,
                  out_s_inv_ptr, out_zero_ptr, out_r_inv_ptr, stride_rb, stride_rc, stride_rh, stride_rw,
                  KH, KW, PADDED, HAS_BIAS, HAS_RES, OUT_Q, OUT_HAS_RINV, OUT_QMIN, OUT_QMAX,
                  acc, zero, w_pad_sum_ptr, scale_ptr, False)


def conv_pads(padding, KH: int, KW: int) -> tuple[int, int, int, int]:
    """(top, bottom, left, right) from None (KH // 2, KW // 2: 'same' for odd kernels), an int, [p], [ph, pw] or
    [top, bottom, left, right]."""
    if padding is None:
        padding = (KH // 2, KW // 2)
    if isinstance(padding, int):
        padding = (padding,)
    padding = tuple(int(p) for p in padding)
    pads = {1: padding * 4, 2: (padding[0],) * 2 + (padding[-1],) * 2, 4: padding}.get(len(padding))
    if pads is None or min(pads) < 0:
        raise ValueError(f"padding must be one, two or four non-negative ints, got {list(padding)}")
    return pads


def conv_output_size(H: int, W: int, KH: int, KW: int, stride: int, pads) -> tuple[int, int]:
    """(OH, OW) of a KH × KW conv of `stride` over H × W with pads (top, bottom, left, right)."""
    top, bottom, left, right = pads
    return (H + top + bottom - KH) // stride + 1, (W + left + right - KW) // stride + 1


def table_clips(w_pad_sum: torch.Tensor) -> tuple[int, int, int]:
    """A padding table's bottom, left and right extents less one: the conv kernels' `clip_*` arguments."""
    return tuple(d - 1 for d in w_pad_sum.shape[1:4])


def padding_sums(w_int: torch.Tensor, pads: tuple[int, int, int, int]) -> torch.Tensor:
    """Σ of the integer weights [N, C, KH, KW] over the taps a pixel keeps, for every clipping the padding
    (top, bottom, left, right) allows: [pt+1, pb+1, pl+1, pr+1, N] int32, entry (a, b, c, d) summing filter
    rows [a, KH − b) and columns [c, KW − d) (0 where that is empty) — the conv epilogue's zero-point term
    (`_padding_corrected`). An output pixel loses at most the padding's rows and columns, whatever the input
    size, so the table serves every input the layer sees."""
    pt, pb, pl, pr = pads
    N, _, KH, KW = w_int.shape
    tap = w_int.to(torch.int32).sum(dim=1, dtype=torch.int32)  # [N, KH, KW]
    table = torch.zeros((pt + 1, pb + 1, pl + 1, pr + 1, N), dtype=torch.int32, device=w_int.device)
    for a, b, c, d in itertools.product(range(pt + 1), range(pb + 1), range(pl + 1), range(pr + 1)):
        table[a, b, c, d] = tap[:, a:max(KH - b, a), c:max(KW - d, c)].sum(dim=(1, 2), dtype=torch.int32)
    return table


def prepare_conv_weight(w_int: torch.Tensor, bits: int, padding=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Offline: integer conv weights [N, C, KH, KW] → (kernel operand, `padding_sums` for `padding`).

    The operand is [N, KH, KW, C] int8 (C contiguous), or for 4 bits `pack_int4` of it along C:
    uint8 [N, KH, KW, ⌈C/2⌉] (an odd C padded with a zero nibble per tap). The sums give the zero-point
    correction of every pixel, border pixels' out-of-image taps reading the code z; they depend on the
    padding (`conv_pads`: None is KH // 2, KW // 2); `qconv` takes it for any padding up to that one.
    """
    if w_int.dtype != torch.int8 or w_int.dim() != 4:
        raise TypeError(f"prepare_conv_weight expects int8 [N, C, KH, KW], got {w_int.dtype} {tuple(w_int.shape)}")
    w_sums = padding_sums(w_int, conv_pads(padding, w_int.shape[2], w_int.shape[3]))
    w_nhwc = w_int.permute(0, 2, 3, 1).contiguous()
    w_op = pack_int4(w_nhwc) if bits == 4 else w_nhwc
    return w_op.contiguous(), w_sums


# Convs whose whole reduction KH·KW·C is at most this gather every tap's codes into one K tile: the image and
# latent input convs (C = 3, 4), which otherwise take nine 32-wide steps of which 3 / 32 are channels. H200,
# 29 Nov (`benchmarks/results/conv-hoist-pack-h200/`): 3.2× (embedded C3 32×32) and 2.7× (SD-1.5 b8 C4 64×64).
PACK_TAPS_K = 64

# The widest K tile of the configs: splits are capped at the reduction steps it leaves (KH·KW·⌈C/128⌉),
# so that no split is empty whatever tile the autotuner picks.
_MAX_BLOCK_K = 128


def conv_split_k(split_k: int | None, M: int, N: int, C: int, taps: int, sms: int | None) -> int:
    """Splits of the conv reduction (taps × C) for M output pixels × N channels (1: no split).

    None asks `choose_split_k` with K = taps·C for a GPU of `sms` SMs (the output tiles against the
    SMs) and never splits without one (`sms` None: CPU); an explicit count is capped at the
    reduction steps of the widest K tile.
    """
    if split_k is None:
        split_k = choose_split_k(M, N, taps * C, sms) if sms else 1
    if split_k < 1:
        raise ValueError(f"split_k must be None or a positive count, got {split_k}")
    return min(split_k, taps * triton.cdiv(C, _MAX_BLOCK_K))


def _check_padding(padding, size, kernel, stride: int, out_size, N: int, w_pad_sum: torch.Tensor,
                   name: str) -> tuple[int, int, int]:
    """The padding table must cover this call's padding (its extents at least the pads plus one: a pixel's
    filter loses at most the padding's rows and columns) and the output size must be the conv's, which that
    bound assumes. Returns its `table_clips`."""
    dims = tuple(w_pad_sum.shape)
    if len(dims) != 5 or dims[4] != N or any(d < p + 1 for d, p in zip(dims, padding)):
        raise ValueError(f"qconv: {name} of shape {dims} is no padding table for padding {tuple(padding)} "
                         f"(top, bottom, left, right) and {N} channels, which needs "
                         f"{tuple(p + 1 for p in padding) + (N,)} at least: prepare the weights with "
                         f"prepare_conv_weight(w, bits, padding={list(padding)})")
    expect = conv_output_size(*size, *kernel, stride, padding)
    if tuple(out_size) != expect:
        raise ValueError(f"qconv: out is {tuple(out_size)} pixels, a {kernel} conv of stride {stride} and padding "
                         f"{tuple(padding)} over {tuple(size)} gives {expect}")
    return table_clips(w_pad_sum)


def packs_taps(w_op: torch.Tensor, C: int, split_input: bool, split_k: int) -> bool:
    """Whether the `tl.dot` conv reduces over (tap, channel) flattened (`_reduce_packed_taps`): int8 weights,
    one channel range, no split, a multi-tap filter whose KH·KW·C reduction fits PACK_TAPS_K."""
    taps = w_op.shape[1] * w_op.shape[2]
    return (w_op.dtype == torch.int8 and not split_input and split_k == 1 and taps > 1
            and taps * C <= PACK_TAPS_K)


def _conv_wgmma():
    """`conv_wgmma` (imported on first use: it imports this module)."""
    from . import conv_wgmma
    return conv_wgmma


def qconv(x_nhwc: torch.Tensor, w_op: torch.Tensor, w_pad_sum: torch.Tensor, w_scale: torch.Tensor, bias,
          scale: torch.Tensor, zero: torch.Tensor, group: torch.Tensor, group_stride: int,
          stride: int, padding: tuple[int, int, int, int], residual, out: torch.Tensor,
          split_k: int | None = None, out_s_inv=None, out_zero=None, out_r_inv=None, out_bits: int = 8,
          second: tuple | None = None, upsample: int = 1) -> torch.Tensor:
    """Launch on NHWC int8 codes [B, H, W, C] into `out`, an NCHW-shaped channels-last tensor.

    `padding` is (top, bottom, left, right); `residual` (optional) is NCHW-shaped, any strides.
    `split_k` (see `conv_split_k`): n > 1 divides the reduction among n programs per output tile,
    int32 partial sums to a [n, M, N] workspace, then a second kernel adds them in order and runs the
    epilogue: the result is the unsplit one bit for bit; no host sync, so CUDA graphs capture it.
    `out_s_inv`, `out_zero` (and `out_r_inv`, `out_bits`): the next layer's quantizer; `out` is then
    int8 (an NHWC tensor seen as NCHW) and receives its codes of y (`gemm.output_quantizer`).
    `w_pad_sum` is a `prepare_conv_weight` table of at least this padding (checked).
    `second` = (c2, w_op2, w_pad_sum2, scale2, zero2): a split input — channels [c2, C) of the codes are
    the second range, quantized with (scale2, zero2) and multiplied by their own weights (`w_op`, `w_pad_sum`
    then hold channels [0, c2)); one kernel keeps an int32 sum per range and combines them in the epilogue
    as ops/reference.py's `epilogue` does. No split-K with a split input.
    `upsample` = 2: the conv reads the nearest-neighbour 2× upsampling of the codes (pixel (ih, iw) of the
    2H × 2W input is code pixel (ih // 2, iw // 2)) — a diffusers Upsample2D's interpolate and conv in one
    pass, exact because quantizing commutes with repeating pixels.
    """
    B, H, W, C = x_nhwc.shape
    if upsample not in (1, 2):
        raise ValueError(f"qconv: upsample must be 1 or 2, got {upsample}")
    H, W = H * upsample, W * upsample
    N, KH, KW, _ = w_op.shape
    OH, OW = out.shape[2], out.shape[3]
    clips = _check_padding(padding, (H, W), (KH, KW), stride, (OH, OW), N, w_pad_sum, "w_pad_sum")
    if out.numel() == 0:
        return out
    M = B * OH * OW
    if second is not None:
        c2, w_op2, w_pad_sum2, scale2, zero2 = second
        if not 0 < c2 < C:
            raise ValueError(f"qconv: the second channel range starts at c2={c2}, outside the codes' C={C}")
        if split_k is not None and split_k > 1:
            raise ValueError(f"qconv: split_k={split_k} with a split input (two channel ranges) is not supported")
        split_k, C, C2 = 1, c2, C - c2
        if w_pad_sum2.shape != w_pad_sum.shape:
            raise ValueError(f"qconv: the two ranges' padding tables differ, {tuple(w_pad_sum.shape)} and "
                             f"{tuple(w_pad_sum2.shape)}: prepare both with the same padding")
    else:
        w_op2, w_pad_sum2, scale2, zero2, C2 = w_op, w_pad_sum, scale, zero, 0
    if widen.WIDEN and w_op.dtype == torch.uint8:  # the int8 kernels on widened copies (TCAQ_W4_WIDEN=0: not)
        w_op = widen.widen_int4(w_op, C)
        w_op2 = widen.widen_int4(w_op2, C2) if second is not None else w_op
    sms = torch.cuda.get_device_properties(out.device).multi_processor_count if out.is_cuda and AUTO_SPLIT_K else None
    split_k = conv_split_k(split_k, M, N, C, KH * KW, sms)
    part = torch.empty((split_k, M, N), dtype=torch.int32, device=out.device) if split_k > 1 else out
    res = residual if residual is not None else out
    bias_arg = bias if bias is not None else w_scale
    res_strides = (res.stride(0), res.stride(1), res.stride(2), res.stride(3))
    out_tables, out_meta = output_quantizer(out, out_s_inv, out_zero, out_r_inv, out_bits)
    tail = dict(KH=KH, KW=KW, STRIDE=stride, PADDED=any(padding), SPLIT_K=split_k, HAS_BIAS=bias is not None,
                HAS_RES=residual is not None, **out_meta)
    # the conv kernels' (not split-K's epilogue)
    conv_tail = dict(tail, UP=upsample, TWO_Q=second is not None)
    second_args = (w_op2, w_pad_sum2, scale2, zero2)
    # split convs go to the Gluon kernel only under TCAQ_WGMMA=1 ("all") until its split-K has run on a GPU
    if (gemm.use_wgmma(x_nhwc) and (split_k == 1 or gemm.WGMMA == "all")
            and _conv_wgmma().supported(x_nhwc, w_op, M, C, w_op2)):
        _conv_wgmma().launch(x_nhwc, w_op, w_pad_sum, w_scale, bias_arg, res, out, part, scale, zero, group, out_tables,
                             group_stride, padding, conv_tail, second_args, C, H, W)
    else:
        grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]), split_k)
        _qconv_kernel[grid](
            x_nhwc, w_op, w_pad_sum, w_scale, bias_arg, res, out, part,
            scale, zero, group, *out_tables, *second_args,
            B, H, W, C, C2, N, OH, OW, padding[0], padding[2], *clips, group_stride,
            w_op.stride(0), w_op2.stride(0), *res_strides, W4=w_op.dtype == torch.uint8, **conv_tail,
            PACK_TAPS=C if packs_taps(w_op, C, second is not None, split_k) else 0,
        )
    if split_k > 1:
        block_m, block_n = 32, 64
        _splitk_conv_epilogue_kernel[(triton.cdiv(M, block_m), triton.cdiv(N, block_n))](
            part, w_pad_sum, w_scale, bias_arg, res, out, scale, zero, group, *out_tables,
            H, W, N, OH, OW, M, padding[0], padding[2], *clips, group_stride, *res_strides,
            BLOCK_M=block_m, BLOCK_N=block_n, num_warps=4, **tail,
        )
    return out
