"""GroupNorm + SiLU + activation quantize: a ResBlock's `norm → silu → conv` input in one pass.

    codes[b, s, c] = quantize(silu(γ[c]·(x[b, s, c] − μ[b, n])·ρ[b, n] + β[c]))   with n = c // (C/G)

In a diffusers ResnetBlock2D the conv after `norm1`/`norm2` only ever sees the quantized SiLU
output, so the float GroupNorm and SiLU results never need to reach memory: torch writes and
re-reads them (GroupNorm, SiLU, then the quantize kernel — three passes over a bf16 tensor), this
writes the int8 codes the conv reads, NHWC, in one pass after the statistics.

Two kernels, no host sync (CUDA-graph safe):
1. `_gn_stats_kernel`, one program per (sample, norm group, split of the pixels): count, mean and
   M2 of its slice in fp32, tile by tile with Chan's parallel update (a shifted two-pass per tile,
   no Σx² cancellation when the mean is large against the spread).
2. `_gn_silu_quantize_kernel`, a BLOCK_S × BLOCK_C tile of one sample (like quantize.py): combines
   the splits' partial statistics of its channels' groups (same formula, fixed order: deterministic),
   normalises, applies γ/β and SiLU in fp32, then quantizes exactly like quantize.py — per-sample
   timestep group read on the device, TCR `r_inv`, the products `(y·r_inv)·s_inv`, round half to even.

The statistics are fp32 like torch's, but not summed in torch's order: a code may differ from
`quantize(silu(F.group_norm(x)))` by one where that value lies within a few fp32 ulps of a rounding
boundary (tests/triton/test_groupnorm.py bounds exactly that).
"""
import torch
import triton
import triton.language as tl

from .numerics import interpreting, quantize_uniform, tuning_bench
from .quantize import sample_tile, tile_configs

# Statistics programs wanted per SM before the pixels of a group are split further.
_STATS_PROGRAMS_PER_SM = 2
_MIN_PIXELS_PER_SPLIT = 256
_MAX_SPLIT = 32


@triton.jit
def _chan_merge(n_a, mean_a, m2_a, n_b, mean_b, m2_b):
    """Chan et al.'s merge of two (count, mean, M2) summaries; an empty side leaves the other as is."""
    n = n_a + n_b
    w_b = tl.where(n > 0, n_b / tl.maximum(n, 1.0), 0.0)
    delta = mean_b - mean_a
    return n, mean_a + delta * w_b, m2_a + m2_b + delta * delta * n_a * w_b


@triton.jit
def _gn_stats_kernel(
    x_ptr, part_ptr, S, C, CG, NG, pixels_per_split, part_stride,
    stride_xb, stride_xs, stride_xc,
    BLOCK_S: tl.constexpr, BLOCK_CG: tl.constexpr,
):
    bn = tl.program_id(0)  # sample · NG + norm group
    split = tl.program_id(1)
    b = bn // NG
    c = (bn % NG) * CG + tl.arange(0, BLOCK_CG)
    c_mask = c < (bn % NG) * CG + CG
    s_lo = split * pixels_per_split
    s_hi = tl.minimum(s_lo + pixels_per_split, S)
    base = x_ptr + b.to(tl.int64) * stride_xb + (c * stride_xc)[None, :]

    n = tl.full((), 0.0, tl.float32)
    mean = tl.full((), 0.0, tl.float32)
    m2 = tl.full((), 0.0, tl.float32)
    for s0 in range(s_lo, s_hi, BLOCK_S):
        rows = s0 + tl.arange(0, BLOCK_S)
        mask = (rows < s_hi)[:, None] & c_mask[None, :]
        x = tl.load(base + rows[:, None].to(tl.int64) * stride_xs, mask=mask, other=0.0).to(tl.float32)
        n_t = tl.sum(tl.sum(mask.to(tl.float32), axis=1), axis=0)
        mean_t = tl.sum(tl.sum(x, axis=1), axis=0) / n_t
        d = tl.where(mask, x - mean_t, 0.0)
        m2_t = tl.sum(tl.sum(d * d, axis=1), axis=0)
        n, mean, m2 = _chan_merge(n, mean, m2, n_t, mean_t, m2_t)
    idx = bn * tl.num_programs(1) + split
    tl.store(part_ptr + idx, n)
    tl.store(part_ptr + part_stride + idx, mean)
    tl.store(part_ptr + 2 * part_stride + idx, m2)


@triton.jit
def _group_moments(part_ptr, part_stride, bn, c_mask, SPLIT: tl.constexpr, SPLIT_P2: tl.constexpr):
    """(mean, M2 / count) of the norm groups `bn` [BLOCK_C] from their SPLIT partial summaries."""
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
    x_ptr, out_ptr, part_ptr, gamma_ptr, beta_ptr, r_inv_ptr, s_inv_ptr, zero_ptr, group_ptr,
    S, C, CG, NG, eps, part_stride, group_stride,
    stride_xb, stride_xs, stride_xc, stride_ob, stride_os,
    SPLIT: tl.constexpr, SPLIT_P2: tl.constexpr, HAS_AFFINE: tl.constexpr, HAS_RINV: tl.constexpr,
    QMIN: tl.constexpr, QMAX: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr,
):
    b, rows, cols, s_inv, zero = sample_tile(s_inv_ptr, zero_ptr, group_ptr, group_stride, BLOCK_S, BLOCK_C)
    c_mask = cols < C
    mean, var = _group_moments(part_ptr, part_stride, b * NG + cols // CG, c_mask, SPLIT, SPLIT_P2)
    rstd = 1.0 / tl.sqrt_rn(var + eps)

    mask = (rows < S)[:, None] & c_mask[None, :]
    x_ptrs = x_ptr + b.to(tl.int64) * stride_xb + rows[:, None].to(tl.int64) * stride_xs + cols[None, :] * stride_xc
    x = tl.load(x_ptrs, mask=mask, other=0.0).to(tl.float32)
    y = (x - mean[None, :]) * rstd[None, :]
    if HAS_AFFINE:
        gamma = tl.load(gamma_ptr + cols, mask=c_mask, other=0.0).to(tl.float32)
        y = y * gamma[None, :] + tl.load(beta_ptr + cols, mask=c_mask, other=0.0).to(tl.float32)[None, :]
    y = y / (1.0 + tl.exp(-y))  # SiLU
    if HAS_RINV:
        y = y * tl.load(r_inv_ptr + cols, mask=c_mask, other=1.0)[None, :]
    q = quantize_uniform(y, s_inv, zero, QMIN, QMAX)
    out_ptrs = out_ptr + b.to(tl.int64) * stride_ob + rows[:, None].to(tl.int64) * stride_os + cols[None, :]
    tl.store(out_ptrs, q, mask=mask)


def stats_split(batch: int, num_groups: int, pixels: int, device: torch.device) -> int:
    """How many programs share one (sample, norm group): enough statistics programs to fill the
    GPU (`_STATS_PROGRAMS_PER_SM` per SM), none with fewer than `_MIN_PIXELS_PER_SPLIT` pixels."""
    if device.type != "cuda":
        return 1
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    want = triton.cdiv(_STATS_PROGRAMS_PER_SM * sms, batch * num_groups)
    return max(1, min(want, pixels // _MIN_PIXELS_PER_SPLIT, _MAX_SPLIT))


def groupnorm_silu_quantize_bsc(x3: torch.Tensor, num_groups: int, eps: float, gamma, beta, s_inv: torch.Tensor,
                                zero: torch.Tensor, group: torch.Tensor, group_stride: int, bits: int, r_inv,
                                out: torch.Tensor, split: int | None = None) -> torch.Tensor:
    """Launch on a [B, S, C] view (any strides) into int8 codes `out` [B, S, C] (last dim contiguous).

    `gamma`/`beta` [C] (or both None: no affine); `split` overrides `stats_split` (tests).
    """
    B, S, C = x3.shape
    if C % num_groups:
        raise ValueError(f"GroupNorm: {C} channels do not split into {num_groups} groups")
    if (gamma is None) != (beta is None):
        raise ValueError("GroupNorm: pass both weight and bias, or neither")
    if out.numel() == 0:
        return out
    cg = C // num_groups
    split = split or stats_split(B, num_groups, S, x3.device)
    pixels = triton.cdiv(S, split)
    part_stride = B * num_groups * split
    part = torch.empty(3 * part_stride, dtype=torch.float32, device=x3.device)
    block_cg = triton.next_power_of_2(cg)
    block_s = 32 if interpreting() else max(16, min(256, 4096 // block_cg))
    _gn_stats_kernel[(B * num_groups, split)](
        x3, part, S, C, cg, num_groups, pixels, part_stride, x3.stride(0), x3.stride(1), x3.stride(2),
        BLOCK_S=block_s, BLOCK_CG=block_cg, num_warps=4,
    )
    grid = lambda meta: (triton.cdiv(S, meta["BLOCK_S"]), triton.cdiv(C, meta["BLOCK_C"]), B)
    _gn_silu_quantize_kernel[grid](
        x3, out, part, gamma if gamma is not None else part, beta if beta is not None else part,
        r_inv if r_inv is not None else s_inv, s_inv, zero, group,
        S, C, cg, num_groups, eps, part_stride, group_stride,
        x3.stride(0), x3.stride(1), x3.stride(2), out.stride(0), out.stride(1),
        SPLIT=split, SPLIT_P2=triton.next_power_of_2(split), HAS_AFFINE=gamma is not None,
        HAS_RINV=r_inv is not None, QMIN=-(1 << (bits - 1)), QMAX=(1 << (bits - 1)) - 1,
    )
    return out
