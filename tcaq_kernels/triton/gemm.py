"""W8A8 / W4A8 GEMM with the zero-point, scale, bias and residual epilogue (DESIGN.md §3).

    y[m, n] = s_w[n]·s_a[g(m)]·(Σ_k w[n,k]·a[m,k] − z[g(m)]·Σ_k w[n,k]) + bias[n] (+ res[m, n])

`a` is int8 codes [M, K], or float activations that the prologue quantizes tile by tile in
registers (`A_FLOAT`: the standalone quantize pass and its int8 round trip through memory
disappear). The row's timestep group g(m) = group[m // rows_per_sample] is read on the device.

Weights are [N, K] int8, K contiguous — the K-major operand int8 wgmma needs — or packed int4
[N, ⌈K/2⌉] (`pack_int4`, low nibble = even k): Hopper has no 4-bit MMA (DESIGN.md §4), so int4
halves the weight bytes but multiplies as int8. By default `widen.py` widens the whole packed weight
ahead of the int8 kernel (faster, see below); with TCAQ_W4_WIDEN=0 this kernel widens tiles in registers.
Accumulation is int32 through `tl.dot` on int8; `Σ_k w` is precomputed offline, so the zero-point
correction is one multiply-subtract per output in the epilogue.

Small M (time embeddings, text tokens, the 8×8 levels) gives fewer output tiles than SMs: the K
loop is then split (`choose_split_k`), each split writes int32 partial sums and a second kernel adds
them in split order and runs the same epilogue (`linear_epilogue`) — integer addition, so the
result is bit-exact and deterministic whatever the split, and nothing syncs with the host.

Quantized output (`OUT_Q`): where the next layer is quantized too, the epilogue can store that
layer's int8 activation codes [M, N] instead of y — `quantize_uniform` of the fp32 y (bias and
residual added) with its tables s_inv[g(m)], z[g(m)] and its TCR reciprocal r_inv[n], (y·r_inv)·s_inv
in that order. The codes are the host's `quantize_uniform` of the fp32 output bit for bit (a bf16
output quantized afterwards can differ by one where its rounding crosses a boundary); one byte is
written per output instead of two or four, and the next layer's quantize pass disappears.

Performance limits (measured, benchmarks/results/kernels.md): Triton 3.6 issues an int8 wgmma
synchronously — its MMAv3 pipeliner keeps a dot asynchronous only for fp32 accumulators — so the
tensor cores idle while each k-step's MMA is waited on, and the int8 kernel runs at about bf16
cuBLAS speed (≈740 TOPS at best), not at the 2× the int8 peak allows. Register-side operands (int4
widening, the float prologue) also round-trip through shared memory, hence in-loop W4A8 ≈ 0.5× W8A8.
"""
import os

import torch
import triton
import triton.language as tl

from ..quant.primitives import pack_int4, qrange
from . import widen
from .numerics import (grouped_tile, interpreting, quantize_output, quantize_uniform, quick_tuning, tuning_bench,
                       unpack_int4_rows)
from .quantize import quantize_bsc


def _configs():
    if interpreting():
        return [triton.Config({"BLOCK_M": 32, "BLOCK_N": 16, "BLOCK_K": 64, "GROUP_M": 4}, num_warps=4)]
    cfg = lambda bm, bn, bk, w, s: triton.Config(
        {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8}, num_warps=w, num_stages=s)
    # large M (SD 64×64 and 32×32 levels, DDPM at batch 256); N = 320 fits 64-wide tiles
    large = [cfg(128, 128, 64, 4, 4), cfg(128, 256, 128, 8, 3), cfg(128, 128, 128, 8, 4),
             cfg(128, 64, 128, 4, 4), cfg(64, 128, 128, 4, 4), cfg(64, 64, 128, 4, 4)]
    # small M (time embedding, text tokens): weight streaming
    small = [cfg(16, 64, 128, 4, 4), cfg(16, 128, 128, 4, 3), cfg(32, 64, 128, 4, 4)]
    return [large[0], small[0]] if quick_tuning() else large + small


def _prune(configs, named_args, **kwargs):
    """Tiles of 16/32 rows only for small M, and never for large M; BLOCK_K never past K (or the
    K range of one split)."""
    M, K = named_args["M"], min(named_args["K"], named_args["k_per_split"])
    small = [c for c in configs if c.kwargs["BLOCK_M"] <= 32]
    large = [c for c in configs if c.kwargs["BLOCK_M"] > 32]
    keep = small if M <= 32 else large
    fit = [c for c in keep if c.kwargs["BLOCK_K"] <= max(32, triton.next_power_of_2(K))]
    return fit or keep


@triton.autotune(configs=_configs(), key=["M", "N", "K", "A_FLOAT", "W4", "SPLIT_K", "OUT_Q"],
                 prune_configs_by={"early_config_prune": _prune}, do_bench=tuning_bench)
@triton.heuristics({"EVEN_K": lambda a: a["K"] % a["BLOCK_K"] == 0})
@triton.jit
def _qgemm_kernel(
    a_ptr, w_ptr, w_sum_ptr, w_scale_ptr, bias_ptr, res_ptr, out_ptr, part_ptr,
    r_inv_ptr, s_inv_ptr, scale_ptr, zero_ptr, group_ptr, out_s_inv_ptr, out_zero_ptr, out_r_inv_ptr,
    M, N, K, k_per_split, rows_per_sample, group_stride,
    stride_am, stride_ak, stride_wn, stride_rm, stride_rn, stride_om,
    A_FLOAT: tl.constexpr, HAS_RINV: tl.constexpr, QMIN: tl.constexpr, QMAX: tl.constexpr,
    W4: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr, SPLIT_K: tl.constexpr,
    OUT_Q: tl.constexpr, OUT_HAS_RINV: tl.constexpr, OUT_QMIN: tl.constexpr, OUT_QMAX: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    EVEN_K: tl.constexpr,
):
    pid_m, pid_n = grouped_tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    if SPLIT_K > 1:  # this program sums k in [k_lo, k_hi); k_per_split is a multiple of every BLOCK_K
        k_lo = tl.program_id(1) * k_per_split
        k_hi = tl.minimum(k_lo + k_per_split, K)
    else:  # constant bounds: the unsplit kernel compiles as it did before split-K existed
        k_lo = 0
        k_hi = K

    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    # Wrapped indices keep every operand load in bounds without masks; the store is masked.
    rm_in = rm % M
    rn_in = rn % N
    g = tl.load(group_ptr + (rm_in // rows_per_sample) * group_stride)
    zero = tl.load(zero_ptr + g)

    rk = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + rm_in[:, None].to(tl.int64) * stride_am + (k_lo + rk)[None, :] * stride_ak
    if W4:
        rkw = tl.arange(0, BLOCK_K // 2)
        w_ptrs = w_ptr + rn_in[:, None].to(tl.int64) * stride_wn + (k_lo // 2 + rkw)[None, :]
        k_packed = (K + 1) // 2
        p_next = tl.load(w_ptrs, mask=rkw[None, :] < k_packed - k_lo // 2, other=0)
    else:
        w_ptrs = w_ptr + rn_in[:, None].to(tl.int64) * stride_wn + (k_lo + rk)[None, :]
    if A_FLOAT:
        s_inv = tl.load(s_inv_ptr + g)[:, None]
        zero_col = zero[:, None]
        x_next = tl.load(a_ptrs, mask=rk[None, :] < K - k_lo, other=0.0)

    # Operands that pass through registers (float activations to quantize, int4 weights to widen)
    # are not software-pipelined by Triton, so the next tile is prefetched by hand, one iteration
    # ahead; int8 operands are left to Triton's cp.async pipeline.
    acc = tl.full((BLOCK_M, BLOCK_N), 0, tl.int32)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        if A_FLOAT:
            u = x_next.to(tl.float32)
            a_ptrs += BLOCK_K * stride_ak
            x_next = tl.load(a_ptrs, mask=rk[None, :] < K - k0 - BLOCK_K, other=0.0)
            if HAS_RINV:
                u = u * tl.load(r_inv_ptr + k0 + rk, mask=rk < K - k0, other=1.0)[None, :]
            # Lanes past K become the code z here, but meet zero weights below.
            a = quantize_uniform(u, s_inv, zero_col, QMIN, QMAX)
        else:
            if EVEN_K:
                a = tl.load(a_ptrs)
            else:
                a = tl.load(a_ptrs, mask=rk[None, :] < K - k0, other=0)
            a_ptrs += BLOCK_K * stride_ak
        if W4:
            w = unpack_int4_rows(p_next, BLOCK_N, BLOCK_K)
            w_ptrs += BLOCK_K // 2
            p_next = tl.load(w_ptrs, mask=rkw[None, :] < k_packed - (k0 + BLOCK_K) // 2, other=0)
        else:
            if EVEN_K:
                w = tl.load(w_ptrs)
            else:
                w = tl.load(w_ptrs, mask=rk[None, :] < K - k0, other=0)
            w_ptrs += BLOCK_K
        acc = tl.dot(a, tl.trans(w), acc, out_dtype=tl.int32)

    if SPLIT_K > 1:
        # int32 partial sums; `_splitk_epilogue_kernel` adds them in split order (exact) and finishes
        part = part_ptr + tl.program_id(1).to(tl.int64) * M * N + rm[:, None].to(tl.int64) * N + rn[None, :]
        tl.store(part, acc, mask=(rm < M)[:, None] & (rn < N)[None, :])
    else:
        linear_epilogue(acc, rm, rn, M, N, zero, g, w_sum_ptr, w_scale_ptr, scale_ptr, bias_ptr, res_ptr, out_ptr,
                        out_s_inv_ptr, out_zero_ptr, out_r_inv_ptr, stride_rm, stride_rn, stride_om,
                        HAS_BIAS, HAS_RES, OUT_Q, OUT_HAS_RINV, OUT_QMIN, OUT_QMAX)


@triton.jit
def linear_epilogue(acc, rm, rn, M, N, zero, g, w_sum_ptr, w_scale_ptr, scale_ptr, bias_ptr, res_ptr, out_ptr,
                    out_s_inv_ptr, out_zero_ptr, out_r_inv_ptr, stride_rm, stride_rn, stride_om,
                    HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr, OUT_Q: tl.constexpr, OUT_HAS_RINV: tl.constexpr,
                    OUT_QMIN: tl.constexpr, OUT_QMAX: tl.constexpr):
    """Zero-point correction in int32, then acc·(s_w·s_a) + bias (+ residual) in fp32 (scale formed
    first), stored to out[rm, rn] — or, with OUT_Q, its int8 codes for the next layer
    (`quantize_output`); `zero`/`g` are the rows' zero points and timestep groups."""
    n_mask = rn < N
    acc = acc - zero[:, None] * tl.load(w_sum_ptr + rn, mask=n_mask, other=0)[None, :]
    s_a = tl.load(scale_ptr + g)
    y = acc.to(tl.float32) * (tl.load(w_scale_ptr + rn, mask=n_mask, other=0.0)[None, :] * s_a[:, None])
    if HAS_BIAS:
        y = y + tl.load(bias_ptr + rn, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    mask = (rm < M)[:, None] & n_mask[None, :]
    if HAS_RES:
        res = tl.load(res_ptr + rm[:, None].to(tl.int64) * stride_rm + rn[None, :] * stride_rn, mask=mask)
        y = y + res.to(tl.float32)
    if OUT_Q:
        y = quantize_output(y, rn, n_mask, g, out_s_inv_ptr, out_zero_ptr, out_r_inv_ptr,
                            OUT_HAS_RINV, OUT_QMIN, OUT_QMAX)
    out_ptrs = out_ptr + rm[:, None].to(tl.int64) * stride_om + rn[None, :]
    tl.store(out_ptrs, y.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _splitk_epilogue_kernel(
    part_ptr, w_sum_ptr, w_scale_ptr, bias_ptr, res_ptr, out_ptr, scale_ptr, zero_ptr, group_ptr,
    out_s_inv_ptr, out_zero_ptr, out_r_inv_ptr,
    M, N, rows_per_sample, group_stride, stride_rm, stride_rn, stride_om,
    SPLIT_K: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr,
    OUT_Q: tl.constexpr, OUT_HAS_RINV: tl.constexpr, OUT_QMIN: tl.constexpr, OUT_QMAX: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (rm < M)[:, None] & (rn < N)[None, :]
    g = tl.load(group_ptr + ((rm % M) // rows_per_sample) * group_stride)
    part = part_ptr + rm[:, None].to(tl.int64) * N + rn[None, :]
    acc = tl.full((BLOCK_M, BLOCK_N), 0, tl.int32)
    for _ in range(0, SPLIT_K):  # in split order: deterministic (and integer, so exact)
        acc += tl.load(part, mask=mask, other=0)
        part += M * N
    linear_epilogue(acc, rm, rn, M, N, tl.load(zero_ptr + g), g, w_sum_ptr, w_scale_ptr, scale_ptr, bias_ptr,
                    res_ptr, out_ptr, out_s_inv_ptr, out_zero_ptr, out_r_inv_ptr, stride_rm, stride_rn, stride_om,
                    HAS_BIAS, HAS_RES, OUT_Q, OUT_HAS_RINV, OUT_QMIN, OUT_QMAX)


def prepare_linear_weight(w_int: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Offline: integer weights [N, K] → (kernel operand, Σ_k w as int32 [N]).

    The operand is int8 [N, K] for 8/6-bit weights and `pack_int4`'s uint8 [N, ⌈K/2⌉] for 4 bits.
    """
    if w_int.dtype != torch.int8 or w_int.dim() != 2:
        raise TypeError(f"prepare_linear_weight expects int8 [N, K], got {w_int.dtype} {tuple(w_int.shape)}")
    w_sum = w_int.to(torch.int32).sum(dim=1, dtype=torch.int32)
    w_op = pack_int4(w_int) if bits == 4 else w_int
    return w_op.contiguous(), w_sum.contiguous()


# Split-K: used when the output tiles would fill fewer than half the SMs; each split gets at least
# _MIN_K_PER_SPLIT of the reduction, in multiples of _K_ALIGN (a multiple of every BLOCK_K).
_MIN_K_PER_SPLIT = 256
_K_ALIGN = 128
_MAX_SPLIT_K = 16
#: Whether `split_k=None` may split (GEMM and conv). Off: timed on an H200 (SD-1.5 b2 GEMMs,
#: benchmarks/results/wgmma-variants-h200/splitk-sd15-b2/), the heuristic's splits help the in-loop W4 and
#: fused-quantize kernels at M = 2 but slow the W8A8 kernel wherever M ≥ 128 (512×1280×1280: 10.2 → 16.0 µs).
#: `TCAQ_AUTO_SPLIT_K=1` turns the heuristic on; an explicit `split_k=n` always splits.
AUTO_SPLIT_K = os.environ.get("TCAQ_AUTO_SPLIT_K", "0") == "1"
#: Which calls go to the Gluon kernels of `gemm_wgmma.py` / `conv_wgmma.py` where they can (sm_90,
#: M ≥ 64, 16-byte-aligned rows), which keep one int8 wgmma in flight
#: where Triton's `tl.dot` waits on each. "codes" (default): calls whose activations arrive as int8
#: codes — on an H100 (SD-1.5 b2+b8 medians, benchmarks/results/gluon-h100/) they matched `tl.dot` at
#: W8A8 (GEMM 0.99× cuBLAS bf16 both; conv 1.09× vs 1.07× cuDNN) and beat it at W4A8 (GEMM 0.62× vs
#: 0.55×, conv 0.59× vs 0.54×; the gain is at batch 2); float inputs left to the prologue (GEMMs under
#: `PREQUANTIZE_MIN_M` rows, or with TCAQ_PREQUANTIZE=0) stay on `tl.dot`, whose fused quantize was faster
#: (0.58× vs 0.45×: Gluon stores the codes through shared memory).
#: `TCAQ_WGMMA=1`: "all" supported calls; `TCAQ_WGMMA=0`: "off".
def wgmma_policy(switch: str) -> str:
    """The routing policy a TCAQ_WGMMA value names; any other value (e.g. the removed "persistent") is an
    error, not the default."""
    if switch not in ("", "1", "0"):
        raise ValueError(f"TCAQ_WGMMA={switch!r}: expected unset, '1' (all) or '0' (off)")
    return {"": "codes", "1": "all", "0": "off"}[switch]


WGMMA = wgmma_policy(os.environ.get("TCAQ_WGMMA", ""))


#: Float activations of calls with at least `PREQUANTIZE_MIN_M` rows are quantized first by the quantize kernel
#: (one read of x, int8 codes out) and the GEMM then runs on codes — on the Gluon kernel where it applies —
#: instead of quantizing in the GEMM's prologue, which re-reads and re-quantizes each A tile once per column of
#: output tiles (N / BLOCK_N times) and keeps the call on `tl.dot`. On an H200 (29 Nov, one `ab_env.py` run,
#: benchmarks/results/cutlass-gemm-h200/) float-input W8A8 GEMMs went from 0.43× to 0.74× cuBLAS bf16 (SD-1.5
#: b8 median; 512×1280×5120 103 → 24 µs), W4A8 0.21× → 0.47×; only at 65536×128×128 (one column of tiles: A
#: read once either way) the prologue stayed faster (22 vs 26 µs). The codes are the same integers (both
#: quantize with `numerics.quantize_uniform`), so the outputs agree bit for bit. `TCAQ_PREQUANTIZE=0`: always fuse.
PREQUANTIZE = os.environ.get("TCAQ_PREQUANTIZE", "1") != "0"
PREQUANTIZE_MIN_M = 64


def prequantized(a2: torch.Tensor, s_inv: torch.Tensor, zero: torch.Tensor, group: torch.Tensor, group_stride: int,
                 rows_per_sample: int, a_bits: int, r_inv) -> torch.Tensor:
    """int8 codes [M, K] of float activations a2 [M, K] (row m in sample m // rows_per_sample), by the quantize
    kernel: what the GEMM's A_FLOAT prologue would compute."""
    M, K = a2.shape
    samples = M // rows_per_sample if group_stride else 1
    codes = torch.empty((M, K), dtype=torch.int8, device=a2.device)
    quantize_bsc(a2.unflatten(0, (samples, M // samples)), s_inv, zero, group, group_stride, a_bits, r_inv,
                 log2=False, pack4=False, out=codes.view(samples, M // samples, K))
    return codes


#: `TCAQ_CUTLASS_GEMM=1` (off by default, not yet timed in a UNet): calls on int8 codes and int8 weights of at
#: least `CUTLASS_MIN_MNK` multiply-adds whose output the CUTLASS kernels write (`cutlass_takes`) run on csrc/sm90
#: (`cuda_ext.gemm_sm90`, the same contract bit for bit). On an H200 (29 Nov, kernels.py SD-1.5 b2 + b8,
#: benchmarks/results/cutlass-gemm-h200/gemm-sd15/) its `auto` tile beat the Triton / Gluon kernels on every
#: GEMM of ≥ 2^31 multiply-adds but one (1.02–1.49×; 2048×640×2560 0.99×) and lost 1–2 µs on the small ones.
CUTLASS = os.environ.get("TCAQ_CUTLASS_GEMM", "0") == "1"
CUTLASS_MIN_MNK = 1 << 31


def cutlass_takes(M: int, N: int, K: int, a_dtype: torch.dtype, w_dtype: torch.dtype, out_dtype: torch.dtype,
                  residual: bool, out_quantized: bool, split_k: int) -> bool:
    """Whether a call may go to the CUTLASS GEMM: int8 codes × int8 weights (int4 ones widened first), a bf16
    output with no residual and no output quantizer, one K split, the TMA alignments (K % 16, N % 8), and at
    least `CUTLASS_MIN_MNK` multiply-adds."""
    return (a_dtype == torch.int8 and w_dtype == torch.int8 and out_dtype == torch.bfloat16 and not residual
            and not out_quantized and split_k == 1 and K % 16 == 0 and N % 8 == 0 and M * N * K >= CUTLASS_MIN_MNK)


def use_wgmma(a: torch.Tensor) -> bool:
    """Whether the routing policy (`WGMMA`) sends a call with activations `a` to a Gluon kernel (which then
    still checks it can take the shapes)."""
    return WGMMA == "all" or (WGMMA == "codes" and a.dtype == torch.int8)


def choose_split_k(M: int, N: int, K: int, sms: int) -> int:
    """Splits of the K loop for an M×N×K GEMM on `sms` SMs (1: no split).

    The output tile count is estimated with the tiles the autotuner keeps for that M (16×64 for
    M ≤ 32, 128×128 above); splitting stops at enough programs for the SMs, at _MIN_K_PER_SPLIT
    of K per split, and at _MAX_SPLIT_K (each split adds M·N·4 bytes of partial sums).
    """
    bm, bn = (16, 64) if M <= 32 else (128, 128)
    tiles = triton.cdiv(M, bm) * triton.cdiv(N, bn)
    if 2 * tiles >= sms:
        return 1
    return max(1, min(sms // tiles, K // _MIN_K_PER_SPLIT, _MAX_SPLIT_K))


def k_range_per_split(K: int, split_k: int) -> tuple[int, int]:
    """(K per split rounded up to _K_ALIGN, the number of non-empty splits that gives)."""
    per = triton.cdiv(triton.cdiv(K, max(split_k, 1)), _K_ALIGN) * _K_ALIGN
    return per, triton.cdiv(K, per)


def output_quantizer(out: torch.Tensor, out_s_inv, out_zero, out_r_inv, out_bits: int) -> tuple[tuple, dict]:
    """Epilogue arguments (GEMM and conv) of the output: the next layer's quantizer tables
    (s_inv[G], zero[G], r_inv[N]) as kernel pointers, and the OUT_* constexprs.

    `out_s_inv` None stores the float y (the pointers are then `out`, never read); otherwise `out` is
    int8 and receives `quantize_uniform` codes of y with `out_bits`.
    """
    quantized = out_s_inv is not None
    if quantized != (out.dtype == torch.int8):
        raise ValueError(f"a {out.dtype} output with out_s_inv={'given' if quantized else 'None'}: int8 codes "
                         "need the next layer's tables, a float output takes none")
    qmin, qmax = qrange(out_bits)
    tables = (out_s_inv, out_zero, out_r_inv if out_r_inv is not None else out_s_inv) if quantized else (out,) * 3
    return tables, dict(OUT_Q=quantized, OUT_HAS_RINV=quantized and out_r_inv is not None, OUT_QMIN=qmin, OUT_QMAX=qmax)


def _wgmma():
    """`gemm_wgmma` (imported on first use: it imports this module, and Gluon only matters on a GPU)."""
    from . import gemm_wgmma
    return gemm_wgmma


def qgemm(a2: torch.Tensor, w_op: torch.Tensor, w_sum: torch.Tensor, w_scale: torch.Tensor,
          bias, s_inv: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group: torch.Tensor,
          group_stride: int, rows_per_sample: int, a_bits: int, r_inv, residual2, out: torch.Tensor,
          split_k: int | None = None, out_s_inv=None, out_zero=None, out_r_inv=None, out_bits: int = 8) -> torch.Tensor:
    """Launch on a2 [M, K] (int8 codes, or float when the prologue quantizes) into out [M, N].

    `w_op` is int8 [N, K] or packed uint8 [N, ⌈K/2⌉]: by default (`widen.WIDEN`) one pass widens the whole
    packed weight ahead of the int8 kernel; with TCAQ_W4_WIDEN=0 the kernel widens int4 tiles in registers.
    `split_k`: None chooses (`choose_split_k`, CUDA only, with AUTO_SPLIT_K), 1 never splits, n > 1 splits K n ways
    (int32 partial sums, then a second kernel adds them in order and runs the epilogue: the
    integers are exact and the result deterministic; no host sync, so CUDA graphs capture it).
    `out_s_inv`, `out_zero` (and `out_r_inv`, `out_bits`): the next layer's quantizer; `out` is then
    int8 and receives its codes of y (`output_quantizer`).
    """
    M, K = a2.shape
    N = w_op.shape[0]
    if M == 0 or N == 0:
        return out
    if widen.WIDEN and w_op.dtype == torch.uint8:  # the int8 kernels on a widened copy (TCAQ_W4_WIDEN=0: not)
        w_op = widen.widen_int4(w_op, K)
    if split_k is None:
        auto = a2.is_cuda and AUTO_SPLIT_K
        split_k = choose_split_k(M, N, K, torch.cuda.get_device_properties(a2.device).multi_processor_count) if auto else 1
    if PREQUANTIZE and a2.dtype != torch.int8 and M >= PREQUANTIZE_MIN_M:
        a2, r_inv = prequantized(a2, s_inv, zero, group, group_stride, rows_per_sample, a_bits, r_inv), None
    per_split, split_k = k_range_per_split(K, split_k)
    if CUTLASS and a2.is_cuda and cutlass_takes(M, N, K, a2.dtype, w_op.dtype, out.dtype, residual2 is not None,
                                                out_s_inv is not None, split_k):
        from ..ops import cuda_ext

        rows = cuda_ext.row_tables(M, scale, zero, group, rows_per_sample, group_stride)
        return cuda_ext.gemm_sm90(a2, w_op, w_sum, w_scale, bias, *rows, out=out)
    part = torch.empty((split_k, M, N), dtype=torch.int32, device=a2.device) if split_k > 1 else out
    a_float = a2.dtype != torch.int8
    res = residual2 if residual2 is not None else out
    out_tables, out_meta = output_quantizer(out, out_s_inv, out_zero, out_r_inv, out_bits)
    tail = dict(HAS_BIAS=bias is not None, HAS_RES=residual2 is not None, SPLIT_K=split_k, **out_meta)
    bias_arg = bias if bias is not None else w_scale
    if use_wgmma(a2) and _wgmma().supported(a2, w_op):
        _wgmma().launch(a2, w_op, w_sum, w_scale, bias_arg, res, out, part, r_inv, s_inv, scale, zero, group,
                        out_tables, per_split, split_k, rows_per_sample, group_stride, a_bits, tail)
    else:
        grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]), split_k)
        _qgemm_kernel[grid](
            a2, w_op, w_sum, w_scale, bias_arg, res, out, part,
            r_inv if r_inv is not None else s_inv, s_inv, scale, zero, group, *out_tables,
            M, N, K, per_split, rows_per_sample, group_stride,
            a2.stride(0), a2.stride(1), w_op.stride(0), res.stride(0), res.stride(1), out.stride(0),
            A_FLOAT=a_float, HAS_RINV=a_float and r_inv is not None,
            QMIN=-(1 << (a_bits - 1)), QMAX=(1 << (a_bits - 1)) - 1, W4=w_op.dtype == torch.uint8, **tail,
        )
    if split_k > 1:
        block_m, block_n = 32, 64
        _splitk_epilogue_kernel[(triton.cdiv(M, block_m), triton.cdiv(N, block_n))](
            part, w_sum, w_scale, bias_arg, res, out, scale, zero, group, *out_tables,
            M, N, rows_per_sample, group_stride, res.stride(0), res.stride(1), out.stride(0),
            BLOCK_M=block_m, BLOCK_N=block_n, num_warps=4, **tail,
        )
    return out
