"""Quantized attention: int8 QKᵀ, softmax, P quantized with the group's DAQ kind, P·V (DESIGN.md §3).

Computes `QAttnProcessor.attention` (nn/qattention.py) without a mask, for q [B, heads, Lq, d] and
k, v [B, heads, Lk, d], sample b reading every table at its timestep group g = group[b] on the
device (nothing syncs with the host; CUDA-graph safe):

    q_c, k_c, v_c = quantize_uniform(x, s_inv_x[g], z_x[g])            (symmetric: z = 0)
    S   = (q_c·k_cᵀ)·((s_q[g]·s_k[g])·softmax_scale)                   int32 acc, fp32 scores
    P   = exp(S − rowmax S) / rowsum                                    over all Lk keys
    uniform group: c = quantize_uniform(P, s_inv_p, z_p);  O = (Σ_j c·v_c − z_p·Σ_j v_c)·(s_p·s_v)
    log2 group:    c = quantize_log2(P, s_inv_p);          O = (Σ_j 2^-c·v_c)·(s_p·s_v)
    p_row_norm:    the factor s_p·s_v becomes attention_row_scale(mass, s_p, s_v) = s_v / mass per
                   row (s_p·s_v where mass ≤ 0), mass = Σ_j (c − z) (int32) or Σ_j 2^-c (fp32)
    p_row_max:     P = exp(S − rowmax S) (no division), and — without p_row_norm — the factor is
                   attention_row_scale(Σ_j y_j, s_p, s_v) = s_v / Σ_j y_j, y = P·s_inv (fp32 sum)

Like the reference, the products use the q/k/v codes as they are (their zero points are 0 in every
state `calibrate` writes; the quantize step still adds z, so the codes are the reference's).

Two launches:
1. `_quantize_qkv_kernel` quantizes q, k and v once (not once per tile that reads them) into the
   layouts the MMAs want: q and k codes [B·H, L_pad, DP] (d contiguous: K-major operands of QKᵀ),
   v codes transposed, [B·H, DP, Lk_pad] (keys contiguous: the K-major B operand of P·V that int8
   wgmma requires), as int8 where the layer has uniform groups — with Σ_j v per key block for the
   zero-point term, which the attention kernel adds up (no memset, no atomics) — and as fp16 (the
   log2 path's operand) where it has log2 groups (`p_kinds`), zero past L and d. L_pad is L rounded
   up to 128, so the attention kernel reads its operands without masks. Each program quantizes
   BLOCK_L rows of one tensor (4096 codes): many small programs, since the kernel is a stream of
   loads and stores that wants every SM busy.
   q goes through memory rather than being quantized in the attention kernel: an MMA operand made
   in registers there was re-read from shared memory byte by byte on every key tile (Triton 3.6),
   a loaded one is not.
2. `_qattn_kernel`, one program per (BLOCK_M query rows, b, head), two passes over the keys:
   pass 1: S tile by tile (int8 `tl.dot`, int32 acc), the running row max (of the int32 scores:
           the scale is positive) and the row sum of exp(S − max). Only max and sum leave it.
           With p_row_max pass 1 is the row max alone (int32 scores, no exponential): the map
           quantized does not depend on the sum, which pass 2 accumulates beside P·V.
   pass 2: S again and y = P·s_inv = exp(S − max)·s_inv/sum with the *final* max and sum — P is the
           softmax itself, not an online estimate (a one-pass online softmax cannot quantize P:
           the codes depend on the final max and sum) — quantized in registers, then
           uniform: int8 codes · v codes on the int8 MMA (int32 acc), z·Σv subtracted at the end;
           log2:    the levels 2^-c as fp16 (exact: 2^-24 is fp16's smallest subnormal, the zero
                    code is 0) · v codes as fp16 (exact integers), fp32 accumulation.
   The group's kind is read from `p_kind_ids` on the device and picks the branch at run time, so
   a batch may mix kinds. Epilogue: acc·(s_p·s_v) in fp32 (the scale product formed first, as
   the reference does) — or, row-normalised, acc·(s_v/mass) with the mass summed beside the MMA in
   the same pass (one row reduction per tile, an IEEE division per row) — stored as the output
   dtype into [B, heads, Lq, d].

Short key sequences (Lk ≤ SHORT_KEYS, 32 by default) take one launch instead: `_qattn_short_kernel` quantizes
q, k and v in registers (`_quantize_rows`, the same codes), computes the scores once, takes the row max and
sum from them and finishes as pass 2 does (the same formula for y, codes and epilogue). It saves the quantize
launch and the round trip of the codes through memory, which dominate at a few keys (the embedded model's
mid block: 16), but loses from 77 keys up (see SHORT_KEYS).

Cost per score (MUFU is the limit: two exponentials, one per pass — one with p_row_max): the exponentials are
`ex2.approx.ftz` on the scores in log2 units, one FFMA + one MUFU each; pass 2 folds log2(s_inv/sum)
into the exponent, so y comes straight out of the exp; the uniform code's int8 is the low byte of the bits of
min(y, QMAX − z) + (1.5·2^23 + z) (`_uniform_bits`: 272 instructions per 32 scores of a thread in pass 2's loop on
sm_90a, 305 with the code subtracted first; ties at k + ½ aside, see there), and the log2 level 2^-c is the
exponent field of y after adding 0x800000 − 0x3504F4 (the carry is quantize_log2's √2 rounding) — both the
integers of `quant/primitives.py` for the same y.

Head dims up to 256 are padded to a power of two ≥ 32 (int8 MMA's K) inside (zero codes in the pad);
Lq and Lk are arbitrary (masked), Lk ≠ Lq for cross-attention.

Numerics against the reference: the q/k/v codes and the int32 QKᵀ are bit-exact. y differs from
the reference's fp32 P·s_inv by a few ulp (another exp, summation order, the folded scale), so a P
code can flip where y sits on a rounding boundary; given the codes, the uniform P·V is
integer-exact (and its fp32 epilogue the reference's) and the log2 one exact up to fp32
accumulation order. `qattention_launch(..., debug=True)` also returns the kernel's int32 scores and
P codes, so the tests check each stage.
"""
from __future__ import annotations

import os
from typing import Optional, Sequence

import torch
import triton
import triton.language as tl

from .numerics import exp2_approx, interpreting, quantize_uniform, quick_tuning, tuning_bench

LK_ALIGN = 128  # keys are padded to this; every BLOCK_N divides it
KINDS_UNIFORM, KINDS_LOG2 = 1, 2  # `p_kinds` bits: which P kinds a layer's groups use
KINDS_BOTH = KINDS_UNIFORM | KINDS_LOG2
# codes and warps per program of the q/k/v quantize kernel: the best of 1024–8192 codes × 2/4/8 warps on
# the SD-1.5 levels (H100, CUDA-graph medians; benchmarks/attention_qkv_quantize.py)
QKV_CODES, QKV_WARPS = 4096, 4
VSUM_CODES = tl.constexpr(2048)  # Σ_j v partial sums the attention kernel loads at once (≥ 8 rows: DP ≤ 256)
MAX_HEAD_DIM = 256
# Key sequences up to this length take the one-launch, one-pass `_qattn_short_kernel` (0: never; TCAQ_ATTN_SHORT_KEYS
# for A/B runs, up to SHORT_KEYS_MAX). 32: one 32-key tile, the size measured to win — on an H200 (28 Nov, graph
# medians, full tuning, benchmarks/results/attention-short-h200/) B256 H1 L16 d128 took 12.3 µs against 26.6 for
# the two launches (bf16 SDPA 13.7), while at 77 and 256 keys it lost 1.5× and 3.2× (45.7 vs 30.8 µs for SD-1.5's
# cross-attention at batch 2, 236 vs 74 µs for B256 L256 d128): k and v quantized in registers reach wgmma's
# shared-memory operand through byte-wide stores, and its 255 registers leave one program per SM.
SHORT_KEYS_MAX = 256
SHORT_KEYS = min(int(os.environ.get("TCAQ_ATTN_SHORT_KEYS", 32)), SHORT_KEYS_MAX)


def _configs():
    cfg = lambda bm, bn, w, s: triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)
    if interpreting():
        return [cfg(32, 32, 4, 1)]
    # the first config _prune keeps is the one quick tuning (the GPU tests) uses
    return [cfg(128, 64, 8, 3), cfg(128, 64, 4, 3), cfg(128, 128, 8, 3), cfg(64, 64, 4, 3), cfg(64, 128, 4, 3),
            cfg(64, 64, 8, 2)]


def _prune(configs, named_args, **kwargs):
    """Register budget: BLOCK_M·DP ≤ 128·128 (8 warps at the top); no tiles far past Lq."""
    dp, lq = kwargs["DP"], named_args["Lq"]  # constexprs arrive as keyword arguments
    keep = []
    for c in configs:
        bm = c.kwargs["BLOCK_M"]
        if bm * dp > 128 * 128 or (bm * dp == 128 * 128 and c.num_warps < 8):
            continue
        if bm > max(64, triton.next_power_of_2(lq)):
            continue
        keep.append(c)
    keep = keep or [min(configs, key=lambda c: c.kwargs["BLOCK_M"])]
    return keep[:1] if quick_tuning() else keep


# ---------------------------------------------------------------------------- q / k / v quantize


@triton.jit
def _quantize_qkv_kernel(
    q_ptr, k_ptr, v_ptr, qc_ptr, kc_ptr, vt_ptr, vt16_ptr, vpart_ptr,
    q_s_inv_ptr, q_zero_ptr, k_s_inv_ptr, k_zero_ptr, v_s_inv_ptr, v_zero_ptr, group_ptr, group_stride,
    H, Lq, Lk, D, LQ_PAD, LK_PAD,
    stride_qb, stride_qh, stride_ql, stride_qd, stride_kb, stride_kh, stride_kl, stride_kd,
    stride_vb, stride_vh, stride_vl, stride_vd,
    Q_QMIN: tl.constexpr, Q_QMAX: tl.constexpr, K_QMIN: tl.constexpr, K_QMAX: tl.constexpr,
    V_QMIN: tl.constexpr, V_QMAX: tl.constexpr, DP: tl.constexpr, BLOCK_L: tl.constexpr,
    V_I8: tl.constexpr, V_F16: tl.constexpr,
):
    """Program ranges along axis 0: q row blocks, then k row blocks, then v row blocks — one tensor
    per program, BLOCK_L·DP codes each, so that a launch has many small programs (a program that
    quantized k and v together held 238 registers at DP = 256: one block per SM, latency-bound)."""
    pid = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    g = tl.load(group_ptr + b * group_stride)
    rd = tl.arange(0, DP)
    bh = pid_bh.to(tl.int64)
    q_blocks = LQ_PAD // BLOCK_L
    k_blocks = LK_PAD // BLOCK_L
    if pid < q_blocks:
        rl = pid * BLOCK_L + tl.arange(0, BLOCK_L)
        qc = _quantize_rows(q_ptr + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh, stride_ql, stride_qd,
                            rl, rd, Lq, D, tl.load(q_s_inv_ptr + g), tl.load(q_zero_ptr + g), Q_QMIN, Q_QMAX)
        tl.store(qc_ptr + bh * LQ_PAD * DP + rl[:, None] * DP + rd[None, :], qc)
    elif pid < q_blocks + k_blocks:
        rl = (pid - q_blocks) * BLOCK_L + tl.arange(0, BLOCK_L)
        kc = _quantize_rows(k_ptr + b.to(tl.int64) * stride_kb + h.to(tl.int64) * stride_kh, stride_kl, stride_kd,
                            rl, rd, Lk, D, tl.load(k_s_inv_ptr + g), tl.load(k_zero_ptr + g), K_QMIN, K_QMAX)
        tl.store(kc_ptr + bh * LK_PAD * DP + rl[:, None] * DP + rd[None, :], kc)
    else:
        v_block = pid - q_blocks - k_blocks
        rl = v_block * BLOCK_L + tl.arange(0, BLOCK_L)
        vc = _quantize_rows(v_ptr + b.to(tl.int64) * stride_vb + h.to(tl.int64) * stride_vh, stride_vl, stride_vd,
                            rl, rd, Lk, D, tl.load(v_s_inv_ptr + g), tl.load(v_zero_ptr + g), V_QMIN, V_QMAX)
        # transposed in registers, so the stores run along the keys, contiguous in [DP, LK_PAD]
        vct = tl.trans(vc)
        vt_offs = bh * DP * LK_PAD + rd[:, None] * LK_PAD + rl[None, :]
        if V_I8:  # the uniform groups' operand, and this block's share of Σ_j v (their zero-point term)
            tl.store(vt_ptr + vt_offs, vct)
            tl.store(vpart_ptr + (bh * (LK_PAD // BLOCK_L) + v_block) * DP + rd, tl.sum(vct.to(tl.int32), axis=1))
        if V_F16:  # the log2 groups' fp16 operand (exact integers)
            tl.store(vt16_ptr + vt_offs, vct.to(tl.float16))


@triton.jit
def _quantize_rows(base, stride_l, stride_d, rl, rd, L, D, s_inv, zero, QMIN: tl.constexpr, QMAX: tl.constexpr):
    """int8 codes of rows `rl` (zero past L and D) of the [L, D] matrix at `base`."""
    mask = (rl < L)[:, None] & (rd < D)[None, :]
    x = tl.load(base + rl[:, None].to(tl.int64) * stride_l + rd[None, :] * stride_d, mask=mask, other=0.0)
    return tl.where(mask, quantize_uniform(x.to(tl.float32), s_inv, zero, QMIN, QMAX), 0).to(tl.int8)


# ------------------------------------------------------------------------------------ attention


@triton.jit
def _scores(qc, kc_base, n0, rn, rd, DP: tl.constexpr):
    """int32 QKᵀ of one key tile (int8 MMA)."""
    k = tl.load(kc_base + (n0 + rn)[:, None] * DP + rd[None, :])
    return tl.dot(qc, tl.trans(k), out_dtype=tl.int32)


@triton.jit
def _stats_step(qc, kc_base, n0, rn, rd, rm, Lq, Lk, c2, m_i, l, dbg_ptrs,
                DP: tl.constexpr, MASK: tl.constexpr, DEBUG: tl.constexpr, FAST: tl.constexpr):
    """Pass 1 on one key tile: running row max (of the int32 scores: the scale is positive, so
    max(acc)·scale is the max of the scores) and row sum of exp(S − max), in log2 units. (FAST's
    exponentials flush results below 2^-126 to 0, which changes no P code: they are all the zero code.)"""
    acc = _scores(qc, kc_base, n0, rn, rd, DP)
    if DEBUG:
        tl.store(dbg_ptrs + n0, acc, mask=(rm < Lq)[:, None] & (n0 + rn < Lk)[None, :])
    if MASK:
        acc = tl.where((n0 + rn < Lk)[None, :], acc, -2147483647)
    m_new = tl.maximum(m_i, tl.max(acc, axis=1))
    m2_old = m_i.to(tl.float32) * c2
    m2 = m_new.to(tl.float32) * c2
    e = exp2_approx(acc.to(tl.float32) * c2 - m2[:, None], FAST)
    if MASK:
        e = tl.where((n0 + rn < Lk)[None, :], e, 0.0)
    l = l * exp2_approx(m2_old - m2, FAST) + tl.sum(e, axis=1)
    return m_new, l


@triton.jit
def _max_step(qc, kc_base, n0, rn, rd, rm, Lq, Lk, m_i, dbg_ptrs, DP: tl.constexpr, MASK: tl.constexpr,
              DEBUG: tl.constexpr):
    """Pass 1 of a row-max map on one key tile: the running max of the int32 scores, nothing else."""
    acc = _scores(qc, kc_base, n0, rn, rd, DP)
    if DEBUG:
        tl.store(dbg_ptrs + n0, acc, mask=(rm < Lq)[:, None] & (n0 + rn < Lk)[None, :])
    if MASK:
        acc = tl.where((n0 + rn < Lk)[None, :], acc, -2147483647)
    return tl.maximum(m_i, tl.max(acc, axis=1))


@triton.jit
def _scaled_probs(qc, kc_base, n0, rn, rd, Lk, c2, b2, DP: tl.constexpr, MASK: tl.constexpr, FAST: tl.constexpr):
    """Pass 2: y = P·s_inv = exp(S − max)·s_inv/sum = 2^(acc·c2 + b2), b2 = log2(s_inv/sum) − max₂."""
    acc = _scores(qc, kc_base, n0, rn, rd, DP)
    y = exp2_approx(acc.to(tl.float32) * c2 + b2[:, None], FAST)
    if MASK:
        y = tl.where((n0 + rn < Lk)[None, :], y, 0.0)
    return y


@triton.jit
def _uniform_bits(y, k_max, magic):
    """quantize_uniform of y = P·s_inv ≥ 0, clamp(rint(y) + z, QMIN, QMAX) = rint(min(y, QMAX − z)) + z, as the
    bits of min(y, k_max) + magic, k_max = QMAX − z, magic = 1.5·2^23 + z: the sum lies in [2^23, 2^24), where
    floats are the integers, so its bits are 0x4B400000 + the code and the code's int8 is their low byte
    (`.to(tl.int8)` truncates) — no subtraction on the MMA's path; `_codes_of` gives the int32 code. Ties (y at
    k + ½ exactly) round to the even total where quantize_uniform rounds y to even first: the same code for an
    even z (P's calibrated z is QMIN, −128), one apart for an odd z — a rounding boundary, where the module doc
    already lets a P code differ."""
    return (tl.minimum(y, k_max) + magic).to(tl.int32, bitcast=True)


@triton.jit
def _codes_of(bits):
    """The int32 codes of `_uniform_bits`."""
    return bits - 0x4B400000


@triton.jit
def _log2_levels(y, LEVEL_MIN: tl.constexpr):
    """quantize_log2 + dequantize of y = P·s_inv as one bit trick: y = 1.m·2^e rounds to 2^(e + [m > √2
    mantissa]), i.e. the exponent field after adding 0x800000 − 0x3504F4 (the carry is the rounding);
    code ≥ 0 caps it at 1, and levels below 2^-L (and y = 0) become the zero code's 0."""
    level = ((y.to(tl.int32, bitcast=True) + 0x4AFB0C) & 0x7F800000).to(tl.float32, bitcast=True)
    level = tl.minimum(level, 1.0)
    return tl.where(level >= LEVEL_MIN, level, 0.0)


@triton.jit
def _log2_codes(level, ZERO_CODE: tl.constexpr):
    """The log2 codes of `_log2_levels` (debug output): c for 2^-c, the zero code for 0."""
    return tl.where(level == 0.0, ZERO_CODE, 127 - (level.to(tl.int32, bitcast=True) >> 23))


@triton.jit
def _pv_uniform_step(qc, kc_base, vt_base, n0, rn, rd, rm, Lq, Lk, LK_PAD, c2, b2, k_max, magic, p_zero, acc, mass,
                     dbg_ptrs, DP: tl.constexpr, MASK: tl.constexpr, DEBUG: tl.constexpr, FAST: tl.constexpr,
                     ROW_NORM: tl.constexpr, SUM_Y: tl.constexpr):
    y = _scaled_probs(qc, kc_base, n0, rn, rd, Lk, c2, b2, DP, MASK, FAST)
    if SUM_Y:  # the row-max map's row sum, in units of s_p (masked keys have y = 0)
        mass += tl.sum(y, axis=1)
    bits = _uniform_bits(y, k_max, magic)
    if DEBUG:
        tl.store(dbg_ptrs + n0, _codes_of(bits), mask=(rm < Lq)[:, None] & (n0 + rn < Lk)[None, :])
    if ROW_NORM:  # Σ_j (c − z): masked keys have y = 0, code z, and add nothing
        mass += tl.sum(_codes_of(bits) - p_zero, axis=1)
    vt = tl.load(vt_base + rd[:, None] * LK_PAD + (n0 + rn)[None, :])  # [DP, BLOCK_N], keys contiguous
    return tl.dot(bits.to(tl.int8), tl.trans(vt), acc, out_dtype=tl.int32), mass


@triton.jit
def _pv_log2_step(qc, kc_base, vt_base, n0, rn, rd, rm, Lq, Lk, LK_PAD, c2, b2, acc, mass, dbg_ptrs,
                  LEVEL_MIN: tl.constexpr, ZERO_CODE: tl.constexpr, DP: tl.constexpr,
                  MASK: tl.constexpr, DEBUG: tl.constexpr, FAST: tl.constexpr, ROW_NORM: tl.constexpr,
                  SUM_Y: tl.constexpr):
    y = _scaled_probs(qc, kc_base, n0, rn, rd, Lk, c2, b2, DP, MASK, FAST)
    if SUM_Y:
        mass += tl.sum(y, axis=1)
    level = _log2_levels(y, LEVEL_MIN)
    if DEBUG:
        tl.store(dbg_ptrs + n0, _log2_codes(level, ZERO_CODE), mask=(rm < Lq)[:, None] & (n0 + rn < Lk)[None, :])
    if ROW_NORM:
        mass += tl.sum(level, axis=1)
    vt = tl.load(vt_base + rd[:, None] * LK_PAD + (n0 + rn)[None, :])  # fp16 v codes
    return tl.dot(level.to(tl.float16), tl.trans(vt), acc, out_dtype=tl.float32), mass


@triton.jit
def _row_scale(mass, s_p, s_v):
    """attention_row_scale per row: s_v / mass (IEEE division, as torch's) where the quantized mass is
    positive, else s_p·s_v."""
    m = mass.to(tl.float32)
    pos = m > 0
    return tl.where(pos, tl.math.div_rn(tl.zeros_like(m) + s_v, tl.where(pos, m, 1.0)), s_p * s_v)


@triton.jit
def _score_scale_log2(q_scale_ptr, k_scale_ptr, g, softmax_scale):
    """The reference's score scale (s_q·s_k)·softmax_scale of group g in fp32, in log2 units for exp2."""
    return ((tl.load(q_scale_ptr + g) * tl.load(k_scale_ptr + g)) * softmax_scale) * 1.4426950408889634


@triton.jit
def _store_out(out_ptr, y, b, h, rm, rd, Lq, D, stride_ob, stride_oh, stride_ol, stride_od):
    """Rows `rm` × head dims `rd` of y into out [B, H, Lq, D] of (b, h), as the output dtype (pads masked)."""
    out_ptrs = (out_ptr + b.to(tl.int64) * stride_ob + h.to(tl.int64) * stride_oh
                + rm[:, None].to(tl.int64) * stride_ol + rd[None, :] * stride_od)
    tl.store(out_ptrs, y.to(out_ptr.dtype.element_ty), mask=(rm < Lq)[:, None] & (rd < D)[None, :])


@triton.jit
def _scaled_out(acc, mass, s_p, s_v, ROW_SCALE: tl.constexpr):
    """The P·V accumulator (fp32, zero-point term removed) times s_p·s_v — the scale product formed first,
    as the reference does — or, ROW_SCALE, times each row's `_row_scale` of its mass."""
    if ROW_SCALE:
        return acc * _row_scale(mass, s_p, s_v)[:, None]
    return acc * (s_p * s_v)


@triton.autotune(configs=_configs(), key=["Lq", "Lk", "DP", "DEBUG", "ROW_NORM", "ROW_MAX"],
                 prune_configs_by={"early_config_prune": _prune}, do_bench=tuning_bench)
@triton.jit
def _qattn_kernel(
    qc_ptr, kc_ptr, vt_ptr, vt16_ptr, vpart_ptr, out_ptr, dbg_s_ptr, dbg_p_ptr,
    q_scale_ptr, k_scale_ptr, v_scale_ptr, p_s_inv_ptr, p_zero_ptr, p_scale_ptr, p_kind_ptr, group_ptr,
    softmax_scale, H, Lq, Lk, LQ_PAD, LK_PAD, V_BLOCKS, D, group_stride, stride_ob, stride_oh, stride_ol, stride_od,
    P_QMAX: tl.constexpr,
    LEVEL_MIN: tl.constexpr, ZERO_CODE: tl.constexpr,
    DP: tl.constexpr, DEBUG: tl.constexpr, FAST: tl.constexpr, ROW_NORM: tl.constexpr, ROW_MAX: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    SUM_Y: tl.constexpr = ROW_MAX and not ROW_NORM
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    bh = pid_bh.to(tl.int64)
    g = tl.load(group_ptr + b * group_stride)
    # the reference's score scale (s_q·s_k)·softmax_scale in fp32, in log2 units for exp2
    c2 = _score_scale_log2(q_scale_ptr, k_scale_ptr, g, softmax_scale)

    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = tl.arange(0, BLOCK_N)
    rd = tl.arange(0, DP)
    # q codes from the quantize kernel (a loaded MMA operand stays in shared memory; one made in
    # registers here was re-read byte by byte from shared memory on every key tile)
    qc = tl.load(qc_ptr + bh * LQ_PAD * DP + rm[:, None] * DP + rd[None, :])

    kc_base = kc_ptr + bh * LK_PAD * DP
    dbg_offs = bh * Lq * Lk + rm[:, None].to(tl.int64) * Lk + rn[None, :]
    n_full = (Lk // BLOCK_N) * BLOCK_N

    # pass 1: row max and row sum (row-max maps: the max alone)
    m_i = tl.full((BLOCK_M,), -2147483647, tl.int32)
    if ROW_MAX:
        for n0 in range(0, n_full, BLOCK_N):
            m_i = _max_step(qc, kc_base, n0, rn, rd, rm, Lq, Lk, m_i, dbg_s_ptr + dbg_offs, DP, False, DEBUG)
        if n_full < Lk:
            m_i = _max_step(qc, kc_base, n_full, rn, rd, rm, Lq, Lk, m_i, dbg_s_ptr + dbg_offs, DP, True, DEBUG)
        b2 = tl.math.log2(tl.load(p_s_inv_ptr + g)) - m_i.to(tl.float32) * c2
    else:
        l = tl.full((BLOCK_M,), 0.0, tl.float32)
        for n0 in range(0, n_full, BLOCK_N):
            m_i, l = _stats_step(qc, kc_base, n0, rn, rd, rm, Lq, Lk, c2, m_i, l, dbg_s_ptr + dbg_offs,
                                 DP, False, DEBUG, FAST)
        if n_full < Lk:
            m_i, l = _stats_step(qc, kc_base, n_full, rn, rd, rm, Lq, Lk, c2, m_i, l, dbg_s_ptr + dbg_offs,
                                 DP, True, DEBUG, FAST)
        b2 = tl.math.log2(tl.load(p_s_inv_ptr + g) / l) - m_i.to(tl.float32) * c2

    # pass 2: P·s_inv with the final max (and sum), quantized per the group's kind, times V
    s_p = tl.load(p_scale_ptr + g)
    s_v = tl.load(v_scale_ptr + g)
    if tl.load(p_kind_ptr + g) == 1:  # log2
        v16_base = vt16_ptr + bh * DP * LK_PAD
        acc_f = tl.full((BLOCK_M, DP), 0.0, tl.float32)
        mass_f = tl.full((BLOCK_M,), 0.0, tl.float32)
        for n0 in range(0, n_full, BLOCK_N):
            acc_f, mass_f = _pv_log2_step(qc, kc_base, v16_base, n0, rn, rd, rm, Lq, Lk, LK_PAD, c2, b2, acc_f, mass_f,
                                          dbg_p_ptr + dbg_offs, LEVEL_MIN, ZERO_CODE, DP, False, DEBUG, FAST, ROW_NORM,
                                          SUM_Y)
        if n_full < Lk:
            acc_f, mass_f = _pv_log2_step(qc, kc_base, v16_base, n_full, rn, rd, rm, Lq, Lk, LK_PAD, c2, b2, acc_f,
                                          mass_f, dbg_p_ptr + dbg_offs, LEVEL_MIN, ZERO_CODE, DP, True, DEBUG, FAST,
                                          ROW_NORM, SUM_Y)
        y = _scaled_out(acc_f, mass_f, s_p, s_v, ROW_NORM or SUM_Y)
    else:  # uniform
        vt_base = vt_ptr + bh * DP * LK_PAD
        p_zero = tl.load(p_zero_ptr + g)
        k_max = (P_QMAX - p_zero).to(tl.float32)
        magic = 12582912.0 + p_zero.to(tl.float32)
        acc_i = tl.full((BLOCK_M, DP), 0, tl.int32)
        if SUM_Y:
            mass_i = tl.full((BLOCK_M,), 0.0, tl.float32)
        else:
            mass_i = tl.full((BLOCK_M,), 0, tl.int32)
        for n0 in range(0, n_full, BLOCK_N):
            acc_i, mass_i = _pv_uniform_step(qc, kc_base, vt_base, n0, rn, rd, rm, Lq, Lk, LK_PAD, c2, b2, k_max,
                                             magic, p_zero, acc_i, mass_i, dbg_p_ptr + dbg_offs, DP, False, DEBUG,
                                             FAST, ROW_NORM, SUM_Y)
        if n_full < Lk:
            acc_i, mass_i = _pv_uniform_step(qc, kc_base, vt_base, n_full, rn, rd, rm, Lq, Lk, LK_PAD, c2, b2, k_max,
                                             magic, p_zero, acc_i, mass_i, dbg_p_ptr + dbg_offs, DP, True, DEBUG,
                                             FAST, ROW_NORM, SUM_Y)
        # Σ_j v: the quantize kernel's per-block sums (integers: exact), read a tile of VSUM_CODES at a time
        # (one load in flight per tile, where a row at a time serialised V_BLOCKS loads in every program)
        VSUM_ROWS: tl.constexpr = VSUM_CODES // DP
        rv = tl.arange(0, VSUM_ROWS)
        vsum = tl.full((DP,), 0, tl.int32)
        for i in range(0, V_BLOCKS, VSUM_ROWS):
            part = tl.load(vpart_ptr + (bh * V_BLOCKS + i + rv)[:, None] * DP + rd[None, :],
                           mask=(i + rv < V_BLOCKS)[:, None], other=0)
            vsum += tl.sum(part, axis=0)
        y = _scaled_out((acc_i - p_zero * vsum[None, :]).to(tl.float32), mass_i, s_p, s_v, ROW_NORM or SUM_Y)

    _store_out(out_ptr, y, b, h, rm, rd, Lq, D, stride_ob, stride_oh, stride_ol, stride_od)


# ------------------------------------------------------------------------- short key sequences


def _short_configs():
    cfg = lambda bm, w: triton.Config({"BLOCK_M": bm}, num_warps=w, num_stages=1)
    if interpreting():
        return [cfg(32, 4)]
    # the first config _short_prune keeps is the one quick tuning (the GPU tests) uses
    return [cfg(64, 4), cfg(64, 8), cfg(128, 8), cfg(128, 4), cfg(32, 4)]


def _short_prune(configs, named_args, **kwargs):
    """Register budget: the int32 scores and fp32 y of BLOCK_M × LK_P2 keys, and the BLOCK_M × DP
    accumulator, at most 64 values a thread each; no tiles far past Lq."""
    lk, dp, lq = kwargs["LK_P2"], kwargs["DP"], named_args["Lq"]
    keep = [c for c in configs
            if c.kwargs["BLOCK_M"] * max(lk, dp) <= 64 * 32 * c.num_warps
            and c.kwargs["BLOCK_M"] <= max(64, triton.next_power_of_2(lq))]
    keep = keep or [min(configs, key=lambda c: (c.kwargs["BLOCK_M"], -c.num_warps))]
    return keep[:1] if quick_tuning() else keep


@triton.autotune(configs=_short_configs(), key=["Lq", "Lk", "DP", "LK_P2", "DEBUG", "ROW_NORM", "ROW_MAX"],
                 prune_configs_by={"early_config_prune": _short_prune}, do_bench=tuning_bench)
@triton.jit
def _qattn_short_kernel(
    q_ptr, k_ptr, v_ptr, out_ptr, dbg_s_ptr, dbg_p_ptr,
    q_s_inv_ptr, q_zero_ptr, q_scale_ptr, k_s_inv_ptr, k_zero_ptr, k_scale_ptr, v_s_inv_ptr, v_zero_ptr, v_scale_ptr,
    p_s_inv_ptr, p_zero_ptr, p_scale_ptr, p_kind_ptr, group_ptr,
    softmax_scale, H, Lq, Lk, D, group_stride,
    stride_qb, stride_qh, stride_ql, stride_qd, stride_kb, stride_kh, stride_kl, stride_kd,
    stride_vb, stride_vh, stride_vl, stride_vd, stride_ob, stride_oh, stride_ol, stride_od,
    Q_QMIN: tl.constexpr, Q_QMAX: tl.constexpr, K_QMIN: tl.constexpr, K_QMAX: tl.constexpr,
    V_QMIN: tl.constexpr, V_QMAX: tl.constexpr, P_QMAX: tl.constexpr, LEVEL_MIN: tl.constexpr,
    ZERO_CODE: tl.constexpr, DP: tl.constexpr, LK_P2: tl.constexpr, DEBUG: tl.constexpr, FAST: tl.constexpr,
    ROW_NORM: tl.constexpr, ROW_MAX: tl.constexpr, BLOCK_M: tl.constexpr,
):
    """The whole attention of BLOCK_M query rows when every key fits one tile (Lk ≤ LK_P2): q, k and v
    read as floats and quantized in registers (`_quantize_rows`, the quantize kernel's codes), the scores
    computed once, the row max and sum taken from them, then P·s_inv = 2^(S·c2 + b2) with the final max
    and sum — the two-pass kernel's pass 2 formula — quantized and multiplied by V. One launch and one
    QKᵀ instead of the q/k/v quantize launch plus two passes: at a few hundred keys (the DDPM/embedded
    16×16 level, every cross-attention over 77 text tokens) that launch and its round trip through
    memory cost as much as the attention itself. k and v are quantized by every program of a head
    (Lq / BLOCK_M of them, from L2)."""
    SUM_Y: tl.constexpr = ROW_MAX and not ROW_NORM
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    g = tl.load(group_ptr + b * group_stride)
    c2 = _score_scale_log2(q_scale_ptr, k_scale_ptr, g, softmax_scale)

    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = tl.arange(0, LK_P2)
    rd = tl.arange(0, DP)
    qc = _quantize_rows(q_ptr + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh, stride_ql, stride_qd,
                        rm, rd, Lq, D, tl.load(q_s_inv_ptr + g), tl.load(q_zero_ptr + g), Q_QMIN, Q_QMAX)
    kc = _quantize_rows(k_ptr + b.to(tl.int64) * stride_kb + h.to(tl.int64) * stride_kh, stride_kl, stride_kd,
                        rn, rd, Lk, D, tl.load(k_s_inv_ptr + g), tl.load(k_zero_ptr + g), K_QMIN, K_QMAX)

    acc = tl.dot(qc, tl.trans(kc), out_dtype=tl.int32)
    key_ok = (rn < Lk)[None, :]
    dbg_offs = pid_bh.to(tl.int64) * Lq * Lk + rm[:, None].to(tl.int64) * Lk + rn[None, :]
    dbg_mask = (rm < Lq)[:, None] & key_ok
    if DEBUG:
        tl.store(dbg_s_ptr + dbg_offs, acc, mask=dbg_mask)
    acc = tl.where(key_ok, acc, -2147483647)
    m2 = tl.max(acc, axis=1).to(tl.float32) * c2
    s = acc.to(tl.float32) * c2
    if ROW_MAX:
        b2 = tl.math.log2(tl.load(p_s_inv_ptr + g)) - m2
    else:
        e = tl.where(key_ok, exp2_approx(s - m2[:, None], FAST), 0.0)
        b2 = tl.math.log2(tl.load(p_s_inv_ptr + g) / tl.sum(e, axis=1)) - m2
    y = tl.where(key_ok, exp2_approx(s + b2[:, None], FAST), 0.0)

    # v codes transposed, [DP, LK_P2] (keys contiguous: the K-major B operand int8 wgmma requires), loaded
    # only now so that its registers are not held through the softmax
    vt = _quantize_rows(v_ptr + b.to(tl.int64) * stride_vb + h.to(tl.int64) * stride_vh, stride_vd, stride_vl,
                        rd, rn, D, Lk, tl.load(v_s_inv_ptr + g), tl.load(v_zero_ptr + g), V_QMIN, V_QMAX)
    s_p = tl.load(p_scale_ptr + g)
    s_v = tl.load(v_scale_ptr + g)
    if tl.load(p_kind_ptr + g) == 1:  # log2
        level = _log2_levels(y, LEVEL_MIN)
        if DEBUG:
            tl.store(dbg_p_ptr + dbg_offs, _log2_codes(level, ZERO_CODE), mask=dbg_mask)
        if ROW_NORM:
            mass_f = tl.sum(level, axis=1)
        else:  # the row-max map's Σ_j y (unused without SUM_Y)
            mass_f = tl.sum(y, axis=1)
        acc_f = tl.dot(level.to(tl.float16), tl.trans(vt.to(tl.float16)), out_dtype=tl.float32)
        out = _scaled_out(acc_f, mass_f, s_p, s_v, ROW_NORM or SUM_Y)
    else:  # uniform; masked keys have y = 0, code z, v codes 0: they add nothing to P·V or the mass
        p_zero = tl.load(p_zero_ptr + g)
        bits = _uniform_bits(y, (P_QMAX - p_zero).to(tl.float32), 12582912.0 + p_zero.to(tl.float32))
        if DEBUG:
            tl.store(dbg_p_ptr + dbg_offs, _codes_of(bits), mask=dbg_mask)
        if ROW_NORM:
            mass_u = tl.sum(_codes_of(bits) - p_zero, axis=1)
        else:
            mass_u = tl.sum(y, axis=1)
        acc_i = tl.dot(bits.to(tl.int8), tl.trans(vt), out_dtype=tl.int32)
        vsum = tl.sum(vt.to(tl.int32), axis=1)
        out = _scaled_out((acc_i - p_zero * vsum[None, :]).to(tl.float32), mass_u, s_p, s_v, ROW_NORM or SUM_Y)

    _store_out(out_ptr, out, b, h, rm, rd, Lq, D, stride_ob, stride_oh, stride_ol, stride_od)


# --------------------------------------------------------------------------------------- launch


def _qkv_ranges(bits: Sequence[int]) -> dict:
    """The q/k/v code ranges (signed, `bits[:3]` bits) as the kernels' constexprs."""
    lo = [-(1 << (b_ - 1)) for b_ in bits[:3]]
    return dict(Q_QMIN=lo[0], Q_QMAX=-lo[0] - 1, K_QMIN=lo[1], K_QMAX=-lo[1] - 1, V_QMIN=lo[2], V_QMAX=-lo[2] - 1)


def _p_constants(p_bits: int) -> dict:
    """The P map's constexprs: the uniform code's top, the smallest log2 level kept (2^-L, at most 2^-24 —
    fp16's smallest subnormal), the log2 zero code."""
    level_max = min((1 << p_bits) - 2, 24)
    return dict(P_QMAX=(1 << (p_bits - 1)) - 1, LEVEL_MIN=2.0 ** -level_max, ZERO_CODE=(1 << p_bits) - 1)


def _short_key_tile(Lk: int) -> int:
    """The short kernel's key tile: Lk rounded up to a power of two ≥ 32 (int8 MMA's K)."""
    return max(32, triton.next_power_of_2(Lk))


def padded_head_dim(d: int) -> int:
    return max(32, triton.next_power_of_2(d))  # int8 `tl.dot` needs K ≥ 32 on sm_80+


def qkv_block_rows(dp: int) -> int:
    """Rows per program of the q/k/v quantize kernel: QKV_CODES codes, a divisor of LK_ALIGN."""
    return min(LK_ALIGN, max(8, QKV_CODES // dp))


def quantize_qkv(q, k, v, q_tab, k_tab, v_tab, group, group_stride: int, bits: Sequence[int],
                 p_kinds: int = KINDS_BOTH):
    """q [B, H, Lq, d], k, v [B, H, Lk, d] float → the MMA operands, one launch: q codes
    [B·H, Lq_pad, DP] and k codes [B·H, Lk_pad, DP] int8, v codes [B·H, DP, Lk_pad] as int8 with
    Σ_j v codes per key block [B·H, Lk_pad / BLOCK_L, DP] int32 (read by uniform groups; every entry
    written, so nothing is zeroed first) and as fp16 (read by log2 groups); zero past
    L and d. *_tab = (s_inv, zero, …) tables [G]. `p_kinds` (KINDS_UNIFORM | KINDS_LOG2) names the
    P kinds the groups can have; the v operand of an absent kind is not written (a 1-element stand-in)."""
    if not p_kinds & KINDS_BOTH:
        raise ValueError(f"p_kinds must name uniform ({KINDS_UNIFORM}), log2 ({KINDS_LOG2}) or both, got {p_kinds}")
    B, H, Lq, D = q.shape
    Lk = k.shape[2]
    dp = padded_head_dim(D)
    lq_pad = (Lq + LK_ALIGN - 1) // LK_ALIGN * LK_ALIGN
    lk_pad = (Lk + LK_ALIGN - 1) // LK_ALIGN * LK_ALIGN
    dev = q.device
    v_i8, v_f16 = bool(p_kinds & KINDS_UNIFORM), bool(p_kinds & KINDS_LOG2)
    vt_shape = lambda on: (B * H, dp, lk_pad) if on else (1,)
    qc = torch.empty((B * H, lq_pad, dp), dtype=torch.int8, device=dev)
    kc = torch.empty((B * H, lk_pad, dp), dtype=torch.int8, device=dev)
    vt = torch.empty(vt_shape(v_i8), dtype=torch.int8, device=dev)
    vt16 = torch.empty(vt_shape(v_f16), dtype=torch.float16, device=dev)
    block_l = qkv_block_rows(dp)
    vpart = torch.empty((B * H, lk_pad // block_l, dp) if v_i8 else (1,), dtype=torch.int32, device=dev)
    _quantize_qkv_kernel[((lq_pad + 2 * lk_pad) // block_l, B * H)](
        q, k, v, qc, kc, vt, vt16, vpart, q_tab[0], q_tab[1], k_tab[0], k_tab[1], v_tab[0], v_tab[1],
        group, group_stride, H, Lq, Lk, D, lq_pad, lk_pad, *q.stride(), *k.stride(), *v.stride(),
        **_qkv_ranges(bits), DP=dp, BLOCK_L=block_l, V_I8=v_i8, V_F16=v_f16, num_warps=QKV_WARPS,
    )
    return qc, kc, vt, vt16, vpart


def attention_core(ops, Lq: int, Lk: int, D: int, softmax_scale: float, q_scale, k_scale, v_scale, p_tab,
                   p_kind_ids, group, group_stride: int, p_bits: int, out: torch.Tensor,
                   debug: Optional[Sequence[torch.Tensor]] = None, p_row_norm: bool = False,
                   p_row_max: bool = False) -> torch.Tensor:
    """The attention kernel on the `quantize_qkv` operands `ops`, into `out` [B, H, Lq, D].

    p_tab = (s_inv, zero, scale) tables [G]; `debug` = (scores int32, codes int32), each
    [B, H, Lq, Lk] contiguous, receives the int32 QKᵀ and the P codes.
    """
    qc, kc, vt, vt16, vpart = ops
    B, H = out.shape[:2]
    dp = kc.shape[2]
    if Lq == 0:
        return out
    dbg_s, dbg_p = debug if debug is not None else (vpart, vpart)
    grid = lambda meta: (triton.cdiv(Lq, meta["BLOCK_M"]), B * H)
    _qattn_kernel[grid](
        qc, kc, vt, vt16, vpart, out, dbg_s, dbg_p,
        q_scale, k_scale, v_scale, p_tab[0], p_tab[1], p_tab[2], p_kind_ids, group,
        float(softmax_scale), H, Lq, Lk, qc.shape[1], kc.shape[1], vpart.shape[1] if vpart.dim() == 3 else 0, D,
        group_stride, *out.stride(),
        **_p_constants(p_bits), DP=dp, DEBUG=debug is not None, FAST=not interpreting(), ROW_NORM=bool(p_row_norm),
        ROW_MAX=bool(p_row_max),
    )
    return out


def check_shapes(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"q, k, v must be [B, heads, L, d], got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    B, H, _, D = q.shape
    if k.shape[:2] != (B, H) or v.shape[:2] != (B, H) or k.shape[2] != v.shape[2]:
        raise ValueError(f"k/v batch, heads or length mismatch: {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if k.shape[3] != D or v.shape[3] != D:
        raise ValueError(f"q, k, v need one head dim, got {D}, {k.shape[3]}, {v.shape[3]}")
    if not 1 <= D <= MAX_HEAD_DIM:
        raise ValueError(f"head dim {D} outside 1..{MAX_HEAD_DIM}")
    if k.shape[2] == 0:
        raise ValueError("attention over zero keys")


def qattention_launch(q, k, v, softmax_scale: float, q_tab, k_tab, v_tab, p_tab, p_kind_ids, group,
                      group_stride: int, bits: Sequence[int], out: torch.Tensor, debug: bool = False,
                      p_row_norm: bool = False, p_row_max: bool = False, p_kinds: int = KINDS_BOTH):
    """Both kernels into `out` [B, H, Lq, d]. *_tab = (s_inv, zero, scale) tables [G]; bits = (q, k, v, p);
    `p_row_norm`: P·V divided by each row's quantized P mass (quant/primitives.py `attention_row_scale`);
    `p_row_max`: P = exp(S − row max), P·V divided by Σ_j P·s_inv (`row_max_exp`); `p_kinds`: the
    kinds `p_kind_ids` holds (KINDS_UNIFORM | KINDS_LOG2 bits) — a group of a kind left out would read
    an operand that was not written.

    Returns `out`, or with `debug` (out, int32 scores [B, H, Lq, Lk], int32 P codes [B, H, Lq, Lk]).
    """
    check_shapes(q, k, v)
    B, H, Lq, D = q.shape
    Lk = k.shape[2]
    dbg = None
    if debug:
        dbg = tuple(torch.full((B, H, Lq, Lk), -(1 << 30), dtype=torch.int32, device=q.device) for _ in range(2))
    if uses_short_kernel(Lk, D):
        attention_short(q, k, v, softmax_scale, q_tab, k_tab, v_tab, p_tab, p_kind_ids, group, group_stride, bits,
                        out, dbg, p_row_norm, p_row_max)
    else:
        ops = quantize_qkv(q, k, v, q_tab, k_tab, v_tab, group, group_stride, bits, p_kinds)
        attention_core(ops, Lq, Lk, D, softmax_scale, q_tab[2], k_tab[2], v_tab[2], p_tab,
                       p_kind_ids, group, group_stride, bits[3], out, dbg, p_row_norm, p_row_max)
    return (out, *dbg) if debug else out


def short_kernel_fits(Lk: int, D: int) -> bool:
    """Whether `_qattn_short_kernel` (all keys in one tile) serves Lk keys of head dim D: Lk ≤ SHORT_KEYS_MAX
    and a key tile of at most 256 × 128 codes (the register budget of its scores and its k/v tiles)."""
    return Lk <= SHORT_KEYS_MAX and _short_key_tile(Lk) * padded_head_dim(D) <= 256 * 128


def uses_short_kernel(Lk: int, D: int) -> bool:
    """Whether `qattention_launch` takes `_qattn_short_kernel` for Lk keys of head dim D (Lk ≤ SHORT_KEYS)."""
    return Lk <= SHORT_KEYS and short_kernel_fits(Lk, D)


def attention_short(q, k, v, softmax_scale: float, q_tab, k_tab, v_tab, p_tab, p_kind_ids, group, group_stride: int,
                    bits: Sequence[int], out: torch.Tensor, debug: Optional[Sequence[torch.Tensor]] = None,
                    p_row_norm: bool = False, p_row_max: bool = False) -> torch.Tensor:
    """`_qattn_short_kernel` into `out` (arguments as `qattention_launch`'s; `debug` as `attention_core`'s)."""
    B, H, Lq, D = q.shape
    Lk = k.shape[2]
    if Lq == 0:
        return out
    dbg_s, dbg_p = debug if debug is not None else (out, out)
    grid = lambda meta: (triton.cdiv(Lq, meta["BLOCK_M"]), B * H)
    _qattn_short_kernel[grid](
        q, k, v, out, dbg_s, dbg_p, *q_tab, *k_tab, *v_tab, *p_tab, p_kind_ids, group,
        float(softmax_scale), H, Lq, Lk, D, group_stride, *q.stride(), *k.stride(), *v.stride(), *out.stride(),
        **_qkv_ranges(bits), **_p_constants(bits[3]), DP=padded_head_dim(D), LK_P2=_short_key_tile(Lk),
        DEBUG=debug is not None,
        FAST=not interpreting(), ROW_NORM=bool(p_row_norm), ROW_MAX=bool(p_row_max),
    )
    return out
