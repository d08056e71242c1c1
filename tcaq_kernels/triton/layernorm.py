"""LayerNorm + quantize: the int8 codes of a transformer block's `norm(x)` for the linear that reads it, one pass.

In a Stable Diffusion BasicTransformerBlock, `norm2(x)` feeds only the cross-attention's `to_q` and `norm3(x)`
only the feed-forward's projection. On the triton backend torch wrote the LayerNorm's output (1.18 ms of 23.5 in
an SD-1.5 step at batch 8, H200, benchmarks/results/sd15-e2e-h200/) and the linear's quantize kernel read it
back; here one program normalises BLOCK_M tokens, whole rows of C channels in registers, and writes the
linear's codes.

Numerics: fp32 statistics (mean, then the mean square of x − mean, over the row), y = ((x − mean)·rstd)·γ + β
rounded to x's dtype as torch's LayerNorm output is (`numerics.round_to`), then the linear's TCR factor and
`numerics.quantize_uniform` with the token's timestep-group tables (row m belongs to sample m // rows_per_sample).
torch sums its statistics in another order (Welford), so a code may differ from torch's LayerNorm + quantize by
one where the value lies within fp32 rounding of a rounding boundary — as the fused GroupNorm's.
"""
import torch
import triton
import triton.language as tl

from .numerics import interpreting, quantize_uniform, round_to

#: registers per program: rows × padded channels of fp32
ROW_ELEMENTS = 8192


@triton.jit
def _ln_quantize_kernel(
    x_ptr, out_ptr, w_ptr, b_ptr, r_inv_ptr, s_inv_ptr, zero_ptr, group_ptr, M, C, rows_per_sample, group_stride,
    eps, stride_xm, stride_om,
    QMIN: tl.constexpr, QMAX: tl.constexpr, HAS_AFFINE: tl.constexpr, HAS_RINV: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_C)
    row_mask, col_mask = rows < M, cols < C
    mask = row_mask[:, None] & col_mask[None, :]
    x = tl.load(x_ptr + rows[:, None].to(tl.int64) * stride_xm + cols[None, :], mask=mask, other=0.0)
    dtype = x_ptr.dtype.element_ty
    x = x.to(tl.float32)
    mean = tl.sum(x, axis=1) / C
    d = tl.where(mask, x - mean[:, None], 0.0)
    rstd = tl.math.rsqrt(tl.sum(d * d, axis=1) / C + eps)
    y = d * rstd[:, None]
    if HAS_AFFINE:
        y = y * tl.load(w_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :] \
            + tl.load(b_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    y = round_to(y, dtype)
    if HAS_RINV:
        y = y * tl.load(r_inv_ptr + cols, mask=col_mask, other=1.0)[None, :]
    g = tl.load(group_ptr + (rows // rows_per_sample) * group_stride, mask=row_mask, other=0)
    s_inv = tl.load(s_inv_ptr + g, mask=row_mask, other=1.0)[:, None]
    zero = tl.load(zero_ptr + g, mask=row_mask, other=0)[:, None]
    q = quantize_uniform(y, s_inv, zero, QMIN, QMAX, CLAMP_FIRST=True)
    tl.store(out_ptr + rows[:, None].to(tl.int64) * stride_om + cols[None, :], q, mask=mask)


def tile(C: int) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_C, warps) for rows of C channels: the whole row in one program, ROW_ELEMENTS at most."""
    block_c = triton.next_power_of_2(C)
    if interpreting():
        return 4, block_c, 4
    block_m = max(1, min(16, ROW_ELEMENTS // block_c))
    return block_m, block_c, 8 if block_m * block_c >= 4096 else 4


def layernorm_quantize_2d(x2: torch.Tensor, weight, bias, eps: float, s_inv: torch.Tensor, zero: torch.Tensor,
                          group: torch.Tensor, group_stride: int, rows_per_sample: int, bits: int, r_inv,
                          out: torch.Tensor) -> torch.Tensor:
    """Launch on x2 [M, C] (rows any stride, channels contiguous, float) into int8 codes `out` [M, C]."""
    M, C = x2.shape
    if x2.stride(1) != 1 and C > 1:
        raise ValueError(f"layernorm_quantize: channels must be contiguous, got strides {x2.stride()}")
    if tuple(out.shape) != (M, C) or out.dtype != torch.int8 or (C > 1 and out.stride(1) != 1):
        raise ValueError(f"layernorm_quantize: out must be int8 [{M}, {C}] with contiguous channels, got "
                         f"{out.dtype} {tuple(out.shape)} strides {out.stride()}")
    if (weight is None) != (bias is None):
        raise ValueError("layernorm_quantize: weight and bias come together (or both None)")
    for name, v in (("weight", weight), ("bias", bias), ("r_inv", r_inv)):
        if v is not None and tuple(v.shape) != (C,):
            raise ValueError(f"layernorm_quantize: {name} must have one entry per channel [{C}], got {tuple(v.shape)}")
    if not 2 <= bits <= 8:
        raise ValueError(f"layernorm_quantize: bits must be in [2, 8] (int8 codes), got {bits}")
    if C > ROW_ELEMENTS:
        raise ValueError(f"layernorm_quantize: {C} channels do not fit one program ({ROW_ELEMENTS} at most)")
    if M == 0:
        return out
    block_m, block_c, warps = tile(C)
    _ln_quantize_kernel[(triton.cdiv(M, block_m),)](
        x2, out, weight if weight is not None else s_inv, bias if bias is not None else s_inv,
        r_inv if r_inv is not None else s_inv, s_inv, zero, group, M, C, max(rows_per_sample, 1), group_stride,
        float(eps), x2.stride(0), out.stride(0),
        QMIN=-(1 << (bits - 1)), QMAX=(1 << (bits - 1)) - 1, HAS_AFFINE=weight is not None,
        HAS_RINV=r_inv is not None, BLOCK_M=block_m, BLOCK_C=block_c, num_warps=warps,
    )
    return out
