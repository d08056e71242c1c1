"""GEGLU + quantize: the int8 codes of `a · gelu(gate)` for the linear that reads them, in one pass.

A diffusers FeedForward (every transformer block of Stable Diffusion) runs GEGLU — its projection
h [B, S, 2F] split into a = h[..., :F] and gate = h[..., F:], then a · gelu(gate) (erf form) — and a
linear on the product. On the triton backend that was three passes over strided views: torch's gelu, torch's
multiply, the linear's quantize — 2.2 ms of float elementwise work in a 25 ms SD-1.5 step at batch 8 (H200,
benchmarks/results/sd15-e2e-h200/step_profile.md). Here one program reads a BLOCK_S × BLOCK_C tile of a and
of gate and writes the linear's codes; neither gelu(gate) nor the product reaches memory.

The codes are those of the unfused path: gelu as torch's CUDA kernel forms it, (g·0.5)·(1 + erf(g·float(1/√2)))
in fp32 rounded to h's dtype, the product of the two in fp32 rounded to h's dtype, then the linear's TCR factor
and `numerics.quantize_uniform` with the sample's timestep-group tables (as `quantize.py`). The erf is
libdevice's erff on the GPU — the CUDA math library's, which torch's kernel calls — and Python's math.erf under
the interpreter (torch's CPU erf is its own polynomial: an ulp apart at most, which a bf16 rounding rarely keeps).
"""
import torch
import triton
import triton.language as tl

from .numerics import quantize_uniform, round_to, tuning_bench
from .quantize import sample_tile, tile_configs

#: torch's kAlpha = M_SQRT1_2 (rounded to fp32 where it meets the fp32 gate)
SQRT1_2 = tl.constexpr(0.7071067811865476)


@triton.autotune(configs=tile_configs(), key=["S", "F"], do_bench=tuning_bench)
@triton.jit
def _geglu_quantize_kernel(
    h_ptr, out_ptr, r_inv_ptr, s_inv_ptr, zero_ptr, group_ptr, S, F,
    stride_hb, stride_hs, stride_hc, stride_ob, stride_os, group_stride,
    QMIN: tl.constexpr, QMAX: tl.constexpr, HAS_RINV: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr,
):
    b, rows, cols, s_inv, zero, _, _ = sample_tile(s_inv_ptr, zero_ptr, s_inv_ptr, zero_ptr, group_ptr, group_stride,
                                                   False, BLOCK_S, BLOCK_C)
    mask = (rows < S)[:, None] & (cols < F)[None, :]
    row_ptrs = h_ptr + b.to(tl.int64) * stride_hb + rows[:, None].to(tl.int64) * stride_hs
    a = tl.load(row_ptrs + cols[None, :] * stride_hc, mask=mask, other=0.0)
    g = tl.load(row_ptrs + (F + cols)[None, :] * stride_hc, mask=mask, other=0.0).to(tl.float32)
    dtype = h_ptr.dtype.element_ty
    gelu = round_to((g * 0.5) * (1.0 + tl.math.erf(g * SQRT1_2)), dtype)
    x = round_to(a.to(tl.float32) * gelu, dtype)
    if HAS_RINV:
        x = x * tl.load(r_inv_ptr + cols, mask=cols < F, other=1.0)[None, :]
    q = quantize_uniform(x, s_inv, zero, QMIN, QMAX, CLAMP_FIRST=True)
    out_ptrs = out_ptr + b.to(tl.int64) * stride_ob + rows[:, None].to(tl.int64) * stride_os + cols[None, :]
    tl.store(out_ptrs, q, mask=mask)


def geglu_quantize_bsc(h3: torch.Tensor, s_inv: torch.Tensor, zero: torch.Tensor, group: torch.Tensor,
                       group_stride: int, bits: int, r_inv, out: torch.Tensor) -> torch.Tensor:
    """Launch on h3 [B, S, 2F] (any strides, float) into `out` [B, S, F] int8 (last dim contiguous).

    `group_stride` 0: one timestep group serves every sample. `r_inv` [F] (the linear's TCR reciprocals) or None.
    """
    B, S, two_f = h3.shape
    if two_f % 2:
        raise ValueError(f"GEGLU input: {two_f} channels do not split into value and gate halves")
    F = two_f // 2
    if tuple(out.shape) != (B, S, F) or out.dtype != torch.int8 or (F and out.stride(2) != 1):
        raise ValueError(f"GEGLU codes: out must be int8 [{B}, {S}, {F}] with contiguous channels, got "
                         f"{out.dtype} {tuple(out.shape)} strides {out.stride()}")
    if not 2 <= bits <= 8:
        raise ValueError(f"GEGLU codes: bits must be in [2, 8] (int8 codes), got {bits}")
    if r_inv is not None and tuple(r_inv.shape) != (F,):
        raise ValueError(f"GEGLU codes: r_inv must have one entry per output channel [{F}], got {tuple(r_inv.shape)}")
    if out.numel() == 0:
        return out
    grid = lambda meta: (triton.cdiv(S, meta["BLOCK_S"]), triton.cdiv(F, meta["BLOCK_C"]), B)
    _geglu_quantize_kernel[grid](
        h3, out, r_inv if r_inv is not None else s_inv, s_inv, zero, group, S, F, *h3.stride(), out.stride(0),
        out.stride(1), group_stride, QMIN=-(1 << (bits - 1)), QMAX=(1 << (bits - 1)) - 1, HAS_RINV=r_inv is not None,
    )
    return out
