"""GroupNorm + SiLU + activation quantize: a ResBlock's `norm → silu → conv` input in one pass.

    codes[b, s, c] = quantize(silu(γ[c]·(x[b, s, c] − μ[b, n])·ρ[b, n] + β[c]))   with n = c // (C/G)

In a diffusers ResnetBlock2D the conv after `norm1`/`norm2` only ever sees the quantized SiLU
output, so the float GroupNorm and SiLU results never need to reach memory: torch writes and
re-reads them (GroupNorm, SiLU, then the quantize kernel — three passes over a bf16 tensor), this
writes the int8 codes the conv reads, NHWC, in one pass after the statistics.

No host sync (CUDA-graph safe). Where a sample's norm group (S pixels × C/G channels) fits in one
program's registers (`one_pass_tile`, S·C/G ≤ 16384: the DDPM-CIFAR10 UNet at every level, SD-1.5 at
8×8, at 16×16 where C/G ≤ 64 and at 32×32 where C/G ≤ 16),
`_gn_one_pass_kernel` reads x once: the statistics from the registers (exact mean, then the mean
square deviation), then the codes. Elsewhere two kernels read x twice:
1. `_gn_stats_kernel`, one program per (sample, block of norm groups, split of the group's
   elements): count, mean and M2 of its slice in fp32, tile by tile with Chan et al.'s parallel
   update (a shifted two-pass per tile, no Σx² cancellation when the mean is large against the spread).
2. `_gn_silu_quantize_kernel`, a BLOCK_S × BLOCK_C tile of one sample (like quantize.py): combines
   the splits' partial statistics of its channels' groups (same formula, fixed order: deterministic),
   normalises, applies γ/β and SiLU in fp32, then quantizes exactly like quantize.py — per-sample
   timestep group read on the device, TCR `r_inv`, the products `(y·r_inv)·s_inv`, round half to even.
A third, opt-in path (`_gn_looped_kernel`, TCAQ_GN_LOOPED=1) serves every shape:
one program per sample and ≥ 32-channel slice of whole groups sweeps its S rows three times (mean, squared
deviations, codes), the slice small enough for the later sweeps to come from L2 — aimed at the one-pass
kernel's narrow rows (2–8 channels a group on the embedded model: 8-byte code rows) and at its 4.4× gap
to the memory floor (1.42 ms for the embedded model's 51 norms at batch 256 against ~0.32 ms, H200).
All paths also take quantize.py's split input (channels [c2, C) quantized with a second pair of
tables): the statistics do not depend on the quantizer, so only the codes' tail changes.
They also read a concatenated input in place (`x2`: channels [C1, C) from a second tensor, quantize.py's
`load_channels`): a UNet up block's `torch.cat([hidden, skip], dim=1)` goes into `norm1` (and the 1×1
conv_shortcut) and nowhere else, so the concatenation need not be written. Norm groups may straddle C1;
every element is loaded into the lane (and, for the statistics, the order) a load of the concatenation
would give it, so the codes are the same bit for bit. The second part's arguments come last in every
kernel: without TWO_X each compiles to the single-input instructions (sm_90; placed after x_ptr, the same
code took ptxas 110 registers instead of 96 in the one-pass kernel).

The statistics are fp32 like torch's, but not summed in torch's order: a code may differ from
`quantize(silu(F.group_norm(x)))` by one where that value lies within a few fp32 ulps of a rounding
boundary (tests/triton/test_groupnorm.py bounds exactly that).
"""
import os

import torch
import triton
import triton.language as tl

from .numerics import SILU_EXACT, SILU_FAST, SILU_OFF, interpreting, quantize_uniform, silu, tuning_bench
from .quantize import check_concat, check_split, load_channels, sample_tables, sample_tile, split_tables, tile_configs

# The one-pass kernel's program size in elements of x (fp32, 32 a thread at 8 warps) when it chooses how many
# norm groups a program takes: 8192 rather than 16384 — smaller tiles, more programs in flight: the embedded
# model's W8A8 step from a CUDA graph took 2.33 / 6.15 ms at batch 64 / 256 against 2.43 / 6.43 ms (H200, 28 Nov).
# TCAQ_GN_ONE_PASS_ELEMENTS overrides it for A/B runs.
ONE_PASS_ELEMENTS = int(os.environ.get("TCAQ_GN_ONE_PASS_ELEMENTS", 8192))
# Its register budget: a program may hold up to this many elements where one norm group needs more than
# ONE_PASS_ELEMENTS (then one pass instead of two kernels), or to make a row BLOCK_C = 16 channels wide — one
# whole 32-byte sector of bf16 where 8 channels would read half sectors. 16384 compiles to 128 registers, no
# spills (sm_90a; 32768: 255). On an H200 (29 Nov, kernels.py, benchmarks/results/cutlass-gemm-h200/) 16384 as
# the one size made the 32×32 levels 1.08–1.32× faster (embedded b256; SD-1.5 C320 32×32 and C1280/C1920
# 16×16 went one-pass, 1.75–1.94×) but the embedded 16×16 levels 0.59–0.69× (more groups a program): so
# the budget only admits what 8192 could not take. TCAQ_GN_ONE_PASS_MAX_ELEMENTS=8192 restores the one
# size; 0: always the two-kernel path.
ONE_PASS_MAX_ELEMENTS = int(os.environ.get("TCAQ_GN_ONE_PASS_MAX_ELEMENTS", 16384))
# The looped kernel (`_gn_looped_kernel`) instead of the one-pass and two-kernel paths everywhere, for A/B runs
# (TCAQ_GN_LOOPED=1). Off by default: on an H200 (28 Nov, kernels.py) it beat the one-pass kernel at the
# embedded model's 8×8 and 4×4 levels at batch 256 (17.8 vs 36.8 µs for C256 8×8) and the two-kernel path at
# C384 32×32 (376 vs 432 µs), but lost at 32×32 / 16×16 (112 vs 103 µs for C128 32×32) and on SD-1.5 shapes,
# and the W8A8 step from CUDA graphs was no faster (5.79 vs 5.81 ms at batch 256, 2.43 vs 2.26 at 64).
# Giving the one-pass kernel more programs per SM (8 or 32 instead of 2) did not help either (same day).
LOOPED = os.environ.get("TCAQ_GN_LOOPED", "0") == "1"


def silu_mode(on: bool) -> int:
    """The kernels' SILU constexpr: off, or SiLU in two MUFU instructions and a multiply (`numerics.silu`'s
    SILU_FAST: the same codes and floats as torch's formula, 13–16 % fewer instructions in the one-pass kernel,
    1.02–1.03× median on an H200: benchmarks/results/wgmma-variants-h200/) — torch's formula itself under the
    interpreter, which runs no inline PTX."""
    if not on:
        return SILU_OFF
    return SILU_EXACT if interpreting() else SILU_FAST


# A looped program covers at least this many channels (whole norm groups): 64-byte bf16 rows, 32-byte code rows.
_LOOPED_MIN_COLS = 32
# Statistics programs wanted per SM before the elements of a group are split further.
_STATS_PROGRAMS_PER_SM = 2
_MIN_ELEMENTS_PER_SPLIT = 4096
_MAX_SPLIT = 32


@triton.jit
def _gn_stats_kernel(
    x_ptr, part_ptr, S, CG, NG, per_split, part_stride,
    stride_xb, stride_xs, stride_xc, x2_ptr, C1, stride_x2b, stride_x2s, stride_x2c,
    CHANNEL_FASTEST: tl.constexpr, TWO_X: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_E: tl.constexpr,
):
    """Partial (count, mean, M2) of BLOCK_G norm groups of one sample over one split of their
    elements; element e of a group is (channel, pixel) in the order of the input's memory (with TWO_X
    the order `_stats_tiles` picks for both parts, each element read from the part its channel lies in)."""
    g_blocks = (NG + BLOCK_G - 1) // BLOCK_G
    b = tl.program_id(0) // g_blocks
    grp = (tl.program_id(0) % g_blocks) * BLOCK_G + tl.arange(0, BLOCK_G)
    split = tl.program_id(1)
    g_mask = grp < NG
    e_lo = split * per_split
    e_hi = tl.minimum(e_lo + per_split, CG * S)
    x_b = x_ptr + b.to(tl.int64) * stride_xb
    base = x_b + (grp * CG).to(tl.int64)[:, None] * stride_xc

    n = tl.full((BLOCK_G,), 0.0, tl.float32)
    mean = tl.full((BLOCK_G,), 0.0, tl.float32)
    m2 = tl.full((BLOCK_G,), 0.0, tl.float32)
    for e0 in range(e_lo, e_hi, BLOCK_E):
        e = e0 + tl.arange(0, BLOCK_E)
        if CHANNEL_FASTEST:
            c, s = e % CG, e // CG
        else:
            c, s = e // S, e % S
        mask = g_mask[:, None] & (e < e_hi)[None, :]
        if TWO_X:  # a group may straddle C1: each element's channel picks its part
            x = load_channels((x_b + s.to(tl.int64) * stride_xs)[None, :],
                              (x2_ptr + b.to(tl.int64) * stride_x2b + s.to(tl.int64) * stride_x2s)[None, :],
                              (grp * CG)[:, None] + c[None, :], mask, C1, stride_xc, stride_x2c, True)
        else:
            x = tl.load(base + (c * stride_xc + s.to(tl.int64) * stride_xs)[None, :], mask=mask, other=0.0)
        x = x.to(tl.float32)
        n_t = tl.minimum(e_hi - e0, BLOCK_E).to(tl.float32)
        mean_t = tl.sum(x, axis=1) / n_t
        d = tl.where(mask, x - mean_t[:, None], 0.0)
        m2_t = tl.sum(d * d, axis=1)
        # Chan et al.'s merge of the running (n, mean, M2) with the tile's
        delta = mean_t - mean
        w_t = n_t / (n + n_t)
        mean += delta * w_t
        m2 += m2_t + delta * delta * n * w_t
        n += n_t
    idx = (b * NG + grp) * tl.num_programs(1) + split
    tl.store(part_ptr + idx, n, mask=g_mask)
    tl.store(part_ptr + part_stride + idx, mean, mask=g_mask)
    tl.store(part_ptr + 2 * part_stride + idx, m2, mask=g_mask)


@triton.jit
def _group_moments(part_ptr, part_stride, bn, c_mask, SPLIT: tl.constexpr, SPLIT_P2: tl.constexpr):
    """(mean, M2 / count) of the norm groups `bn` [BLOCK_C] from their SPLIT partial summaries."""
    if SPLIT == 1:
        n = tl.maximum(tl.load(part_ptr + bn, mask=c_mask, other=1.0), 1.0)
        return tl.load(part_ptr + part_stride + bn, mask=c_mask, other=0.0), \
            tl.load(part_ptr + 2 * part_stride + bn, mask=c_mask, other=0.0) / n
    j = tl.arange(0, SPLIT_P2)
    idx = bn[:, None] * SPLIT + j[None, :]
    mask = c_mask[:, None] & (j < SPLIT)[None, :]
    n_j = tl.load(part_ptr + idx, mask=mask, other=0.0)
    mean_j = tl.load(part_ptr + part_stride + idx, mask=mask, other=0.0)
    m2_j = tl.load(part_ptr + 2 * part_stride + idx, mask=mask, other=0.0)
    n = tl.maximum(tl.sum(n_j, axis=1), 1.0)
    mean = tl.sum(n_j * mean_j, axis=1) / n
    d = mean_j - mean[:, None]
    return mean, (tl.sum(m2_j, axis=1) + tl.sum(n_j * d * d, axis=1)) / n


@triton.autotune(configs=tile_configs(), key=["S", "C", "NG"], do_bench=tuning_bench)
@triton.jit
def _gn_silu_quantize_kernel(
    x_ptr, out_ptr, part_ptr, gamma_ptr, beta_ptr, r_inv_ptr, s_inv_ptr, zero_ptr, s_inv2_ptr, zero2_ptr, group_ptr,
    S, C, C2, CG, NG, eps, part_stride, group_stride,
    stride_xb, stride_xs, stride_xc, stride_ob, stride_os, x2_ptr, C1, stride_x2b, stride_x2s, stride_x2c,
    SPLIT: tl.constexpr, SPLIT_P2: tl.constexpr, HAS_AFFINE: tl.constexpr, HAS_RINV: tl.constexpr,
    QMIN: tl.constexpr, QMAX: tl.constexpr, SILU: tl.constexpr, CODES: tl.constexpr, TWO_Q: tl.constexpr,
    TWO_X: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr,
):
    if CODES:
        b, rows, cols, s_inv, zero, s_inv2, zero2 = sample_tile(s_inv_ptr, zero_ptr, s_inv2_ptr, zero2_ptr, group_ptr,
                                                                group_stride, TWO_Q, BLOCK_S, BLOCK_C)
        s_inv, zero = split_tables(cols, C2, s_inv, zero, s_inv2, zero2, TWO_Q)
    else:  # a plain GroupNorm: no quantizer tables (their pointers may be None)
        b, s_inv, zero = tl.program_id(2), 1.0, 0
        rows = tl.program_id(0) * BLOCK_S + tl.arange(0, BLOCK_S)
        cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = cols < C
    mean, var = _group_moments(part_ptr, part_stride, b * NG + cols // CG, c_mask, SPLIT, SPLIT_P2)
    rstd = 1.0 / tl.sqrt_rn(var + eps)

    mask = (rows < S)[:, None] & c_mask[None, :]
    x = load_channels(x_ptr + b.to(tl.int64) * stride_xb + rows[:, None].to(tl.int64) * stride_xs,
                      x2_ptr + b.to(tl.int64) * stride_x2b + rows[:, None].to(tl.int64) * stride_x2s,
                      cols[None, :], mask, C1, stride_xc, stride_x2c, TWO_X).to(tl.float32)
    q = _normalised_out((x - mean[None, :]) * rstd[None, :], cols, c_mask, gamma_ptr, beta_ptr, r_inv_ptr,
                        s_inv, zero, HAS_AFFINE, HAS_RINV, QMIN, QMAX, SILU, CODES)
    out_ptrs = out_ptr + b.to(tl.int64) * stride_ob + rows[:, None].to(tl.int64) * stride_os + cols[None, :]
    tl.store(out_ptrs, q.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _normalised_out(y, cols, c_mask, gamma_ptr, beta_ptr, r_inv_ptr, s_inv, zero, HAS_AFFINE: tl.constexpr,
                    HAS_RINV: tl.constexpr, QMIN: tl.constexpr, QMAX: tl.constexpr, SILU: tl.constexpr,
                    CODES: tl.constexpr):
    """What is stored of the normalised tile y [rows, cols]: γ/β, SiLU and TCR's 1/r in fp32, then
    quantize.py's codes (s_inv/zero scalars, or [1, cols] rows from `split_tables`) — or, without CODES,
    the fp32 values themselves (a plain GroupNorm). Both GroupNorm paths end here, so they differ
    only in their statistics."""
    if HAS_AFFINE:
        gamma = tl.load(gamma_ptr + cols, mask=c_mask, other=0.0).to(tl.float32)
        y = y * gamma[None, :] + tl.load(beta_ptr + cols, mask=c_mask, other=0.0).to(tl.float32)[None, :]
    y = silu(y, SILU)
    if CODES:
        if HAS_RINV:
            y = y * tl.load(r_inv_ptr + cols, mask=c_mask, other=1.0)[None, :]
        y = quantize_uniform(y, s_inv, zero, QMIN, QMAX, CLAMP_FIRST=True)
    return y


@triton.jit
def _group_columns(b, s_inv_ptr, zero_ptr, s_inv2_ptr, zero2_ptr, group_ptr, group_stride, C, C2, CG,
                   CODES: tl.constexpr, TWO_Q: tl.constexpr, GROUPS: tl.constexpr, BLOCK_C: tl.constexpr):
    """(lanes, channels, channel mask, 1/s, z) of a program that holds GROUPS whole norm groups of sample b:
    program_id(0)'s block of GROUPS·CG channels in BLOCK_C lanes, and each channel's quantizer (per column
    for a split input; 1 and 0 for a plain GroupNorm, whose table pointers may be None)."""
    if CODES:
        g = tl.load(group_ptr + b * group_stride)
        s_inv, zero, s_inv2, zero2 = sample_tables(s_inv_ptr, zero_ptr, s_inv2_ptr, zero2_ptr, g, TWO_Q)
    else:
        s_inv, zero, s_inv2, zero2 = 1.0, 0, 1.0, 0
    local = tl.arange(0, BLOCK_C)
    cols = tl.program_id(0) * GROUPS * CG + local
    s_inv, zero = split_tables(cols, C2, s_inv, zero, s_inv2, zero2, TWO_Q)
    return local, cols, (local < GROUPS * CG) & (cols < C), s_inv, zero


@triton.jit
def _gn_one_pass_kernel(
    x_ptr, out_ptr, gamma_ptr, beta_ptr, r_inv_ptr, s_inv_ptr, zero_ptr, s_inv2_ptr, zero2_ptr, group_ptr,
    S, C, C2, CG, eps, group_stride, stride_xb, stride_xs, stride_xc, stride_ob, stride_os,
    x2_ptr, C1, stride_x2b, stride_x2s, stride_x2c,
    HAS_AFFINE: tl.constexpr, HAS_RINV: tl.constexpr, QMIN: tl.constexpr, QMAX: tl.constexpr,
    SILU: tl.constexpr, CODES: tl.constexpr, TWO_Q: tl.constexpr, TWO_X: tl.constexpr,
    GROUPS: tl.constexpr, G_P2: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr, FULL: tl.constexpr,
):
    """GROUPS whole norm groups of one sample (every pixel: S ≤ BLOCK_S) held in registers: the
    statistics (exact mean, then Σ(x − mean)², two passes over the registers) and the codes from one
    read of x. A column's group is picked with a one-hot [G_P2, BLOCK_C] mask (CG need not be a
    power of two). FULL (S = BLOCK_S, GROUPS·CG = BLOCK_C: every UNet level whose group width is a
    power of two): every lane is an element, so the masks are compile-time true — on sm_90a 10–13 % fewer
    instructions and 64 registers instead of 97 at the embedded model's 32×32 level."""
    b = tl.program_id(1)
    local, cols, c_mask, s_inv, zero = _group_columns(b, s_inv_ptr, zero_ptr, s_inv2_ptr, zero2_ptr, group_ptr,
                                                      group_stride, C, C2, CG, CODES, TWO_Q, GROUPS, BLOCK_C)
    rows = tl.arange(0, BLOCK_S)
    if FULL:
        c_mask = local >= 0
        mask = (rows >= 0)[:, None] & c_mask[None, :]
    else:
        mask = (rows < S)[:, None] & c_mask[None, :]
    x = load_channels(x_ptr + b.to(tl.int64) * stride_xb + rows[:, None].to(tl.int64) * stride_xs,
                      x2_ptr + b.to(tl.int64) * stride_x2b + rows[:, None].to(tl.int64) * stride_x2s,
                      cols[None, :], mask, C1, stride_xc, stride_x2c, TWO_X).to(tl.float32)
    onehot = (tl.arange(0, G_P2)[:, None] == (local // CG)[None, :]) & c_mask[None, :]
    n = tl.sum(tl.where(rows < S, 1.0, 0.0)) * CG  # S·CG as fp32 (exact), also when S and CG are constexpr 1
    mean_g = tl.sum(tl.where(onehot, tl.sum(x, axis=0)[None, :], 0.0), axis=1) / n
    mean = tl.sum(tl.where(onehot, mean_g[:, None], 0.0), axis=0)
    if FULL:
        d = x - mean[None, :]
    else:
        d = tl.where(mask, x - mean[None, :], 0.0)
    var_g = tl.sum(tl.where(onehot, tl.sum(d * d, axis=0)[None, :], 0.0), axis=1) / n
    rstd = tl.sum(tl.where(onehot, (1.0 / tl.sqrt_rn(var_g + eps))[:, None], 0.0), axis=0)
    q = _normalised_out(d * rstd[None, :], cols, c_mask, gamma_ptr, beta_ptr, r_inv_ptr, s_inv, zero,
                        HAS_AFFINE, HAS_RINV, QMIN, QMAX, SILU, CODES)
    out_ptrs = out_ptr + b.to(tl.int64) * stride_ob + rows[:, None].to(tl.int64) * stride_os + cols[None, :]
    tl.store(out_ptrs, q.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _gn_looped_kernel(
    x_ptr, out_ptr, gamma_ptr, beta_ptr, r_inv_ptr, s_inv_ptr, zero_ptr, s_inv2_ptr, zero2_ptr, group_ptr,
    S, C, C2, CG, eps, group_stride, stride_xb, stride_xs, stride_xc, stride_ob, stride_os,
    x2_ptr, C1, stride_x2b, stride_x2s, stride_x2c,
    HAS_AFFINE: tl.constexpr, HAS_RINV: tl.constexpr, QMIN: tl.constexpr, QMAX: tl.constexpr,
    SILU: tl.constexpr, CODES: tl.constexpr, TWO_Q: tl.constexpr, TWO_X: tl.constexpr,
    GROUPS: tl.constexpr, G_P2: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """GROUPS whole norm groups of one sample, all S pixels, in three sweeps of BLOCK_S-row tiles: the
    column sums (exact mean), the squared deviations from it (variance), then the codes. Rows of BLOCK_C
    ≥ 32 channels keep the loads and stores whole sectors wide; a program's slice of x (S × BLOCK_C) is
    small enough to be re-read from L2 by the second and third sweeps, so x comes from memory about once
    whatever S is (the one-pass kernel needs S·C/G in registers)."""
    b = tl.program_id(1)
    local, cols, c_mask, s_inv, zero = _group_columns(b, s_inv_ptr, zero_ptr, s_inv2_ptr, zero2_ptr, group_ptr,
                                                      group_stride, C, C2, CG, CODES, TWO_Q, GROUPS, BLOCK_C)
    x_b, x2_b = x_ptr + b.to(tl.int64) * stride_xb, x2_ptr + b.to(tl.int64) * stride_x2b
    out_cols = out_ptr + b.to(tl.int64) * stride_ob + cols[None, :]
    onehot = (tl.arange(0, G_P2)[:, None] == (local // CG)[None, :]) & c_mask[None, :]
    n = S * CG * 1.0  # the group's element count as fp32 (exact below 2^24)

    col_sum = tl.zeros([BLOCK_C], tl.float32)
    for s0 in range(0, S, BLOCK_S):
        rows = s0 + tl.arange(0, BLOCK_S)
        mask = (rows < S)[:, None] & c_mask[None, :]
        x = load_channels(x_b + rows[:, None].to(tl.int64) * stride_xs, x2_b + rows[:, None].to(tl.int64) * stride_x2s,
                          cols[None, :], mask, C1, stride_xc, stride_x2c, TWO_X).to(tl.float32)
        col_sum += tl.sum(x, axis=0)
    mean_g = tl.sum(tl.where(onehot, col_sum[None, :], 0.0), axis=1) / n
    mean = tl.sum(tl.where(onehot, mean_g[:, None], 0.0), axis=0)

    col_sq = tl.zeros([BLOCK_C], tl.float32)
    for s0 in range(0, S, BLOCK_S):
        rows = s0 + tl.arange(0, BLOCK_S)
        mask = (rows < S)[:, None] & c_mask[None, :]
        x = load_channels(x_b + rows[:, None].to(tl.int64) * stride_xs, x2_b + rows[:, None].to(tl.int64) * stride_x2s,
                          cols[None, :], mask, C1, stride_xc, stride_x2c, TWO_X).to(tl.float32)
        d = tl.where(mask, x - mean[None, :], 0.0)
        col_sq += tl.sum(d * d, axis=0)
    var_g = tl.sum(tl.where(onehot, col_sq[None, :], 0.0), axis=1) / n
    rstd = tl.sum(tl.where(onehot, (1.0 / tl.sqrt_rn(var_g + eps))[:, None], 0.0), axis=0)

    for s0 in range(0, S, BLOCK_S):
        rows = s0 + tl.arange(0, BLOCK_S)
        mask = (rows < S)[:, None] & c_mask[None, :]
        x = load_channels(x_b + rows[:, None].to(tl.int64) * stride_xs, x2_b + rows[:, None].to(tl.int64) * stride_x2s,
                          cols[None, :], mask, C1, stride_xc, stride_x2c, TWO_X).to(tl.float32)
        q = _normalised_out((x - mean[None, :]) * rstd[None, :], cols, c_mask, gamma_ptr, beta_ptr, r_inv_ptr,
                            s_inv, zero, HAS_AFFINE, HAS_RINV, QMIN, QMAX, SILU, CODES)
        tl.store(out_cols + rows[:, None].to(tl.int64) * stride_os, q.to(out_ptr.dtype.element_ty), mask=mask)


def looped_tile(S: int, C: int, num_groups: int) -> tuple[int, int, int]:
    """(groups per program, BLOCK_S, BLOCK_C) of the looped kernel: the fewest whole groups (a divisor of
    G) that cover `_LOOPED_MIN_COLS` channels, or all of them; tiles of about 4096 elements."""
    cg = C // num_groups
    groups = next((g for g in range(1, num_groups + 1) if num_groups % g == 0 and g * cg >= _LOOPED_MIN_COLS),
                  num_groups)
    block_c = triton.next_power_of_2(groups * cg)
    return groups, min(triton.next_power_of_2(S), max(1, 4096 // block_c)), block_c


def _stats_tiles(x3: torch.Tensor, num_groups: int, x2: torch.Tensor | None = None) -> tuple[bool, int, int]:
    """(channel fastest in memory, BLOCK_G, BLOCK_E) of the statistics kernel.

    Channels-last input reads several groups' channels together (contiguous bytes); NCHW input
    reads one group's contiguous planes. The interpreter takes every group of a sample at once.
    A concatenated input (x2) is channel fastest where both parts are, as the model's `torch.cat` of
    two channels-last tensors is, else read by planes as its NCHW concatenation: the same summation
    order as the launcher on that concatenation.
    """
    channel_fastest = x3.stride(2) == 1 and x3.shape[1] > 1 and (x2 is None or x2.stride(2) == 1)
    if interpreting():
        return channel_fastest, min(triton.next_power_of_2(num_groups), 32), 64
    return channel_fastest, 4 if channel_fastest else 1, 1024


def stats_split(batch: int, group_blocks: int, elements: int, device: torch.device) -> int:
    """How many programs share one block of norm groups: enough statistics programs to fill the GPU
    (`_STATS_PROGRAMS_PER_SM` per SM), none with fewer than `_MIN_ELEMENTS_PER_SPLIT` elements."""
    if device.type != "cuda":
        return 1
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    want = triton.cdiv(_STATS_PROGRAMS_PER_SM * sms, batch * group_blocks)
    return max(1, min(want, elements // _MIN_ELEMENTS_PER_SPLIT, _MAX_SPLIT))


def one_pass_tile(S: int, C: int, num_groups: int, max_groups: int | None = None) -> tuple[int, int, int] | None:
    """(groups per program, BLOCK_S, BLOCK_C) of the one-pass kernel, or None when one norm group of
    a sample (all S pixels × C/G channels) does not fit `ONE_PASS_MAX_ELEMENTS` in registers. A program
    takes as many groups as fit `ONE_PASS_ELEMENTS` (or the one group, or 16 channels, where those need more)
    and divide G, at most `max_groups` (so that a small batch still fills the GPU); BLOCK_C is at least 16
    where the budget allows."""
    cg = C // num_groups
    block_s = triton.next_power_of_2(S)
    budget = ONE_PASS_MAX_ELEMENTS // block_s
    if cg > budget:
        return None
    cap = max(ONE_PASS_ELEMENTS // block_s, min(16, budget), triton.next_power_of_2(cg))
    most = min(num_groups, max_groups or num_groups)
    groups = max(g for g in range(1, most + 1)  # a divisor of G: every program full
                 if num_groups % g == 0 and triton.next_power_of_2(g * cg) <= cap)
    return groups, block_s, max(triton.next_power_of_2(groups * cg), min(16, budget))


def one_pass_warps(tile: tuple[int, int, int]) -> int:
    """The one-pass kernel's warps for a `one_pass_tile`: 8 from 8192 elements a program (32 a thread), else 4."""
    _, block_s, block_c = tile
    return 8 if block_s * block_c >= 8192 else 4


def full_tile(S: int, cg: int, tile: tuple[int, int, int]) -> bool:
    """Whether a `one_pass_tile` has no idle lane for S pixels of norm groups CG channels wide: S rows in
    BLOCK_S, the program's groups in BLOCK_C (the one-pass kernel's FULL: its masks are then known true)."""
    groups, block_s, block_c = tile
    return block_s == S and block_c == groups * cg


def _fills_gpu(programs: int, device: torch.device) -> bool:
    """Whether `programs` give every SM one (always true off the GPU): the looped kernel's programs each
    sweep a whole slice, so fewer would leave SMs idle (the embedded model at batch 64 has 128–256)."""
    if device.type != "cuda":
        return True
    return programs >= torch.cuda.get_device_properties(device).multi_processor_count


def _groups_per_program(batch: int, num_groups: int, device: torch.device) -> int | None:
    """At most this many norm groups per one-pass program, for `_STATS_PROGRAMS_PER_SM` programs per SM."""
    if device.type != "cuda":
        return None
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, (batch * num_groups) // (_STATS_PROGRAMS_PER_SM * sms))


def groupnorm_silu_quantize_bsc(x3: torch.Tensor, num_groups: int, eps: float, gamma, beta, s_inv: torch.Tensor,
                                zero: torch.Tensor, group: torch.Tensor, group_stride: int, bits: int, r_inv,
                                out: torch.Tensor, split: int | None = None,
                                one_pass: bool | None = None, silu: bool = True, c2: int | None = None,
                                s_inv2: torch.Tensor | None = None, zero2: torch.Tensor | None = None,
                                looped: bool | None = None, x2: torch.Tensor | None = None) -> torch.Tensor:
    """Launch on a [B, S, C] view (any strides) into int8 codes `out` [B, S, C] (last dim contiguous).

    `gamma`/`beta` [C] (or both None: no affine). Where a sample's norm group fits in one program's
    registers (`one_pass_tile`) one kernel reads x once; elsewhere — or with `one_pass=False`, or a
    `split` (tests: it overrides `stats_split`) — the statistics kernel runs first and x is read twice.
    An `out` of another dtype than int8 receives the normalised values (SiLU unless `silu=False`), not codes.
    A split input (`c2`, `s_inv2`, `zero2`, int8 codes only) quantizes channels [c2, C) with the second
    tables, as `quantize_bsc` does; `split` is unrelated (the statistics' split). `looped` (default: the
    module's LOOPED, env TCAQ_GN_LOOPED=1) runs `_gn_looped_kernel` for every shape instead, unless
    `one_pass` or `split` asks for one of the other paths — with the module's switch only where its
    programs (one per sample and slice) give every SM one: SD-1.5 at batch 2 keeps the other paths.
    With `x2` [B, S, C2'] (any strides, same dtype and device) the input is the channel concatenation of x3
    and x2, read in place by every path (an up block's `cat(hidden, skip)` is never written); C, gamma/beta,
    `c2`, `r_inv` and `out` count its channels, norm groups may straddle the boundary, and the result is the
    launcher's on the concatenation bit for bit — on `torch.cat([x3, x2], -1)` where both parts are channels
    fastest, else on the concatenation laid out by channel planes (NCHW), whose summation order the
    two-kernel path's statistics then follow.
    """
    x3, x2, c1, two_x = check_concat(x3, x2)
    B, S = x3.shape[:2]
    C = c1 + (x2.shape[2] if two_x else 0)
    if C % num_groups:
        raise ValueError(f"GroupNorm: {C} channels do not split into {num_groups} groups")
    if (gamma is None) != (beta is None):
        raise ValueError("GroupNorm: pass both weight and bias, or neither")
    codes = out.dtype == torch.int8
    two_q = check_split(C, c2, s_inv, zero, s_inv2, zero2)
    if two_q and not codes:
        raise ValueError(f"GroupNorm: c2 (split input) quantizes, but out is {out.dtype}, not int8 codes")
    tables2 = (s_inv2, zero2) if two_q else (s_inv, zero)
    c2 = c2 if two_q else C
    if out.numel() == 0:
        return out
    cg = C // num_groups
    qmin, qmax = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    groups, block_s, block_c = looped_tile(S, C, num_groups)
    if looped is None:  # the module's switch, where the looped programs fill the GPU (not SD-1.5 at batch 2)
        looped = LOOPED and _fills_gpu(B * (num_groups // groups), x3.device)
    if looped and split is None and one_pass is None:
        _gn_looped_kernel[(num_groups // groups, B)](
            x3, out, gamma, beta, r_inv, s_inv, zero, *tables2, group, S, C, c2, cg, eps, group_stride,
            *x3.stride(), out.stride(0), out.stride(1), x2, c1, *x2.stride(),
            HAS_AFFINE=gamma is not None, HAS_RINV=r_inv is not None, QMIN=qmin, QMAX=qmax, SILU=silu_mode(silu),
            CODES=codes, TWO_Q=two_q, TWO_X=two_x, GROUPS=groups, G_P2=triton.next_power_of_2(groups),
            BLOCK_S=block_s, BLOCK_C=block_c, num_warps=4,
        )
        return out
    tile = None
    if split is None and one_pass is not False:
        tile = one_pass_tile(S, C, num_groups, _groups_per_program(B, num_groups, x3.device))
    if one_pass and tile is None:
        raise ValueError(f"GroupNorm: one_pass=True, but a group of {S} pixels × {cg} channels exceeds "
                         f"ONE_PASS_MAX_ELEMENTS={ONE_PASS_MAX_ELEMENTS}" + (" (split given)" if split else ""))
    if tile is not None:
        groups, block_s, block_c = tile
        _gn_one_pass_kernel[(triton.cdiv(num_groups, groups), B)](
            x3, out, gamma, beta, r_inv, s_inv, zero, *tables2, group, S, C, c2, cg, eps, group_stride,
            *x3.stride(), out.stride(0), out.stride(1), x2, c1, *x2.stride(),
            HAS_AFFINE=gamma is not None, HAS_RINV=r_inv is not None, QMIN=qmin, QMAX=qmax, SILU=silu_mode(silu),
            CODES=codes, TWO_Q=two_q, TWO_X=two_x, GROUPS=groups,
            G_P2=triton.next_power_of_2(groups), BLOCK_S=block_s, BLOCK_C=block_c,
            FULL=full_tile(S, cg, tile), num_warps=one_pass_warps(tile),
        )
        return out
    channel_fastest, block_g, block_e = _stats_tiles(x3, num_groups, x2 if two_x else None)
    group_blocks = triton.cdiv(num_groups, block_g)
    split = split or stats_split(B, group_blocks, cg * S, x3.device)
    part_stride = B * num_groups * split
    part = torch.empty(3 * part_stride, dtype=torch.float32, device=x3.device)
    _gn_stats_kernel[(B * group_blocks, split)](
        x3, part, S, cg, num_groups, triton.cdiv(cg * S, split), part_stride,
        *x3.stride(), x2, c1, *x2.stride(),
        CHANNEL_FASTEST=channel_fastest, TWO_X=two_x, BLOCK_G=block_g, BLOCK_E=block_e, num_warps=4,
    )
    grid = lambda meta: (triton.cdiv(S, meta["BLOCK_S"]), triton.cdiv(C, meta["BLOCK_C"]), B)
    _gn_silu_quantize_kernel[grid](
        x3, out, part, gamma, beta,
        r_inv, s_inv, zero, *tables2, group,
        S, C, c2, cg, num_groups, eps, part_stride, group_stride,
        *x3.stride(), out.stride(0), out.stride(1), x2, c1, *x2.stride(),
        SPLIT=split, SPLIT_P2=triton.next_power_of_2(split), HAS_AFFINE=gamma is not None,
        HAS_RINV=r_inv is not None, QMIN=qmin, QMAX=qmax, SILU=silu_mode(silu), CODES=codes, TWO_Q=two_q, TWO_X=two_x,
    )
    return out


def groupnorm_bsc(x3: torch.Tensor, num_groups: int, eps: float, gamma, beta, out: torch.Tensor,
                  silu: bool = False) -> torch.Tensor:
    """A plain GroupNorm of the [B, S, C] view `x3` (any strides) into `out` [B, S, C] (last dim
    contiguous, float): the same kernels without quantize (and without SiLU unless `silu`), no
    quantizer tables."""
    if out.dtype == torch.int8:
        raise ValueError("groupnorm_bsc writes float values; int8 codes come from groupnorm_silu_quantize_bsc")
    return groupnorm_silu_quantize_bsc(x3, num_groups, eps, gamma, beta, None, None, None, 0, 8, None, out,
                                       silu=silu)
