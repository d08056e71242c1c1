"""Activation quantize kernel: float [B, S, C] (any strides) → codes [B, S, C'] channel-last.

One program quantizes a BLOCK_S × BLOCK_C tile of one sample; the sample's timestep group is read
from `group` on the device and indexes the parameter tables (`s_inv[G]`, `zero[G]`), so nothing
syncs with the host and the launch is CUDA-graph safe. Reading NCHW input (S contiguous) and writing
channel-last codes makes this also the layout change the NHWC conv needs, in the same pass.

Outputs (numerics of `quant/primitives.py`):
* uniform, int8: signed codes `clamp(rint((x·r_inv)·s_inv) + z)`;
* uniform, packed int4 (bits ≤ 4): two codes a byte along C, low nibble = even channel, an odd C
  padded with a zero nibble (`pack_int4`'s format);
* log2, uint8: codes of `quantize_log2` (no TCR factor: log2 is for post-softmax maps).

A split input (uniform only) is a channel concatenation whose two parts were calibrated apart (a UNet
up block's `cat(hidden, skip)`): channels [0, c2) take the tables (s_inv, zero), channels [c2, C)
a second pair (s_inv2, zero2) of the same timestep group, so the concatenation is still one pass.

The concatenation itself need not exist either: given `x2`, the input is the channel concatenation of
x3 [B, S, C1] and x2 [B, S, C2] (each any strides), read in place by `load_channels` — channel c < C1
from x3, c ≥ C1 from x2 — so an up block's `torch.cat([hidden, skip], dim=1)` (~8 % of a quantized
UNet step) is never written; its 1×1 conv_shortcut and fused GroupNorm (groupnorm.py) read the two
parts. The source boundary C1 and the quantizer boundary c2 are independent (often equal).
"""
import torch
import triton
import triton.language as tl

from .numerics import interpreting, quantize_log2, quantize_uniform, quick_tuning, tuning_bench


def tile_configs():
    """Tiles of an elementwise [B, S, C] → channel-last kernel (also the fused GroupNorm's)."""
    if interpreting():
        return [triton.Config({"BLOCK_S": 32, "BLOCK_C": 16}, num_warps=4)]
    if quick_tuning():
        return [triton.Config({"BLOCK_S": 64, "BLOCK_C": 64}, num_warps=4)]
    return [
        triton.Config({"BLOCK_S": 64, "BLOCK_C": 64}, num_warps=4),
        triton.Config({"BLOCK_S": 32, "BLOCK_C": 128}, num_warps=4),
        triton.Config({"BLOCK_S": 128, "BLOCK_C": 32}, num_warps=4),
        triton.Config({"BLOCK_S": 128, "BLOCK_C": 64}, num_warps=8),
    ]


@triton.jit
def sample_tables(s_inv_ptr, zero_ptr, s_inv2_ptr, zero2_ptr, g, TWO_Q: tl.constexpr):
    """(1/s, z) of timestep group g, then the split input's second pair — without TWO_Q the first
    pair again, so an unsplit kernel loads nothing more."""
    s_inv, zero = tl.load(s_inv_ptr + g), tl.load(zero_ptr + g)
    s_inv2, zero2 = s_inv, zero
    if TWO_Q:
        s_inv2, zero2 = tl.load(s_inv2_ptr + g), tl.load(zero2_ptr + g)
    return s_inv, zero, s_inv2, zero2


@triton.jit
def split_tables(cols, C2, s_inv, zero, s_inv2, zero2, TWO_Q: tl.constexpr):
    """The (1/s, z) each channel of `cols` is quantized with, as [1, len(cols)] rows: the first
    quantizer's below C2, the second's from C2 on. Without TWO_Q the scalars, unchanged. (One return:
    the compiler checks every return statement of a function, a constexpr-dead one too, for one type.)"""
    if TWO_Q:
        first = cols < C2
        s_inv, zero = tl.where(first, s_inv, s_inv2)[None, :], tl.where(first, zero, zero2)[None, :]
    return s_inv, zero


@triton.jit
def load_channels(x_ptrs, x2_ptrs, ch, mask, C1, stride_xc, stride_x2c, TWO_X: tl.constexpr):
    """x at channels `ch` (broadcast against the pointers `x_ptrs` of channel 0 of each element's sample
    and pixel), `other` 0. With TWO_X the input is the concatenation of x (channels < C1) and x2
    (channels ≥ C1 at ch − C1; `x2_ptrs`, `stride_x2c` its own): two masked loads and a select, the same
    values in the same lanes as a load of the concatenation. Without TWO_X the single load of old."""
    if TWO_X:
        first = ch < C1
        x = tl.where(first, tl.load(x_ptrs + ch * stride_xc, mask=mask & first, other=0.0),
                     tl.load(x2_ptrs + (ch - C1) * stride_x2c, mask=mask & (ch >= C1), other=0.0))
    else:
        x = tl.load(x_ptrs + ch * stride_xc, mask=mask, other=0.0)
    return x


def check_concat(x3: torch.Tensor, x2: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, int, bool]:
    """(x, x2, C1, TWO_X) of an input given as x3 and, optionally, x2 to concatenate along channels
    (raising ValueError on a part that does not fit). Without x2 — or with an empty part — x2 is the
    one input again (a placeholder: the kernels' signatures stay the same) and TWO_X False."""
    if x2 is None:
        return x3, x3, x3.shape[-1], False
    if x2.dim() != 3 or x2.shape[:2] != x3.shape[:2]:
        raise ValueError(f"x2: shape {tuple(x2.shape)} is not [B, S, C2] with x3's B, S = {tuple(x3.shape[:2])}")
    if x2.dtype != x3.dtype:
        raise ValueError(f"x2: dtype {x2.dtype}, x3 is {x3.dtype}")
    if x2.device != x3.device:
        raise ValueError(f"x2: on {x2.device}, x3 on {x3.device}")
    if x2.shape[2] == 0 or x3.shape[2] == 0:
        x = x2 if x3.shape[2] == 0 else x3
        return x, x, x.shape[2], False
    return x3, x2, x3.shape[2], True


@triton.jit
def sample_tile(s_inv_ptr, zero_ptr, s_inv2_ptr, zero2_ptr, group_ptr, group_stride, TWO_Q: tl.constexpr,
                BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr):
    """This program's sample b, its rows and columns, and the sample's tables (`sample_tables`) read
    on the device, for a grid (S tiles, C tiles, B)."""
    b = tl.program_id(2)
    g = tl.load(group_ptr + b * group_stride)
    rows = tl.program_id(0) * BLOCK_S + tl.arange(0, BLOCK_S)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    s_inv, zero, s_inv2, zero2 = sample_tables(s_inv_ptr, zero_ptr, s_inv2_ptr, zero2_ptr, g, TWO_Q)
    return b, rows, cols, s_inv, zero, s_inv2, zero2


@triton.jit
def _codes(x_ptrs, x2_ptrs, cols, row_mask, C, C1, C2, stride_xc, stride_x2c, r_inv_ptr, s_inv, zero, s_inv2, zero2,
           BITS: tl.constexpr, LOG2: tl.constexpr, HAS_RINV: tl.constexpr, TWO_Q: tl.constexpr, TWO_X: tl.constexpr):
    """Codes of one [BLOCK_S, len(cols)] tile; lanes outside the tensor come back as 0."""
    mask = row_mask[:, None] & (cols < C)[None, :]
    x = load_channels(x_ptrs, x2_ptrs, cols[None, :], mask, C1, stride_xc, stride_x2c, TWO_X).to(tl.float32)
    if LOG2:
        q = quantize_log2(x, s_inv, min((1 << BITS) - 2, 24), (1 << BITS) - 1)
    else:
        if HAS_RINV:
            x = x * tl.load(r_inv_ptr + cols, mask=cols < C, other=1.0)[None, :]
        s_inv, zero = split_tables(cols, C2, s_inv, zero, s_inv2, zero2, TWO_Q)
        q = quantize_uniform(x, s_inv, zero, -(1 << (BITS - 1)), (1 << (BITS - 1)) - 1, CLAMP_FIRST=True).to(tl.int32)
    return tl.where(mask, q, 0)


@triton.autotune(configs=tile_configs(), key=["S", "C", "PACK4", "LOG2"], do_bench=tuning_bench)
@triton.jit
def _quantize_kernel(
    x_ptr, out_ptr, r_inv_ptr, s_inv_ptr, zero_ptr, s_inv2_ptr, zero2_ptr, group_ptr,
    S, C, C2, C_OUT, stride_xb, stride_xs, stride_xc, stride_ob, stride_os, group_stride,
    x2_ptr, C1, stride_x2b, stride_x2s, stride_x2c,  # last: without TWO_X the PTX is the single-input kernel's
    BITS: tl.constexpr, LOG2: tl.constexpr, HAS_RINV: tl.constexpr, PACK4: tl.constexpr,
    TWO_Q: tl.constexpr, TWO_X: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr,
):
    b, rows, cols, s_inv, zero, s_inv2, zero2 = sample_tile(s_inv_ptr, zero_ptr, s_inv2_ptr, zero2_ptr, group_ptr,
                                                            group_stride, TWO_Q, BLOCK_S, BLOCK_C)
    # cols are output columns (bytes when PACK4); each nibble's channel picks its own quantizer
    row_mask = rows < S
    x_ptrs = x_ptr + b.to(tl.int64) * stride_xb + rows[:, None].to(tl.int64) * stride_xs
    x2_ptrs = x2_ptr + b.to(tl.int64) * stride_x2b + rows[:, None].to(tl.int64) * stride_x2s
    if PACK4:  # each nibble's channel is read from its own source too
        lo = _codes(x_ptrs, x2_ptrs, 2 * cols, row_mask, C, C1, C2, stride_xc, stride_x2c, r_inv_ptr,
                    s_inv, zero, s_inv2, zero2, BITS, LOG2, HAS_RINV, TWO_Q, TWO_X)
        hi = _codes(x_ptrs, x2_ptrs, 2 * cols + 1, row_mask, C, C1, C2, stride_xc, stride_x2c, r_inv_ptr,
                    s_inv, zero, s_inv2, zero2, BITS, LOG2, HAS_RINV, TWO_Q, TWO_X)
        out = (lo & 0xF) | ((hi & 0xF) << 4)
    else:
        out = _codes(x_ptrs, x2_ptrs, cols, row_mask, C, C1, C2, stride_xc, stride_x2c, r_inv_ptr,
                     s_inv, zero, s_inv2, zero2, BITS, LOG2, HAS_RINV, TWO_Q, TWO_X)
    out_ptrs = out_ptr + b.to(tl.int64) * stride_ob + rows[:, None].to(tl.int64) * stride_os + cols[None, :]
    tl.store(out_ptrs, out.to(out_ptr.dtype.element_ty), mask=row_mask[:, None] & (cols < C_OUT)[None, :])


def check_split(C: int, c2, s_inv, zero, s_inv2, zero2) -> bool:
    """Whether a split input's second quantizer is given (raising on an incomplete or inconsistent one):
    the kernels' TWO_Q. Caught here, a bad c2 or table would otherwise read out of bounds or quantize silently wrong."""
    given = [name for name, v in (("c2", c2), ("s_inv2", s_inv2), ("zero2", zero2)) if v is not None]
    if not given:
        return False
    if len(given) < 3:
        raise ValueError(f"split input: c2, s_inv2 and zero2 come together, got only {', '.join(given)}")
    if not 0 < c2 < C:
        raise ValueError(f"split input: c2={c2} must satisfy 0 < c2 < C={C}")
    for name, second, first in (("s_inv2", s_inv2, s_inv), ("zero2", zero2, zero)):
        if second.shape != first.shape:
            raise ValueError(f"split input: {name} has shape {tuple(second.shape)}, the first quantizer's "
                             f"table {tuple(first.shape)}")
    return True


def quantize_bsc(x3: torch.Tensor, s_inv: torch.Tensor, zero: torch.Tensor, group: torch.Tensor,
                 group_stride: int, bits: int, r_inv, log2: bool, pack4: bool, out: torch.Tensor, *,
                 c2: int | None = None, s_inv2: torch.Tensor | None = None,
                 zero2: torch.Tensor | None = None, x2: torch.Tensor | None = None) -> torch.Tensor:
    """Launch on a [B, S, C] view (any strides) into `out` [B, S, C'] (last dim contiguous).

    C' is C, or ⌈C/2⌉ when `pack4`; `out` is int8 for uniform codes, uint8 for log2 or packed codes.
    `group_stride` is 0 when one group serves every sample (then `group` may be 0-d).
    A split input (`c2`, `s_inv2`, `zero2`; uniform only) quantizes channels [c2, C) with the second tables.
    With `x2` [B, S, C2'] (any strides; same dtype and device; uniform only) the input is the channel
    concatenation of x3 and x2, read in place (an up block's skip concatenation is never written): the
    codes of `torch.cat([x3, x2], -1)` bit for bit; C, `c2`, `r_inv` and `out` count the concatenation's channels.
    """
    if x2 is not None and log2:
        raise ValueError("x2: a concatenated input is for uniform codes, not log2")
    x3, x2, c1, two_x = check_concat(x3, x2)
    B, S = x3.shape[:2]
    C = c1 + (x2.shape[2] if two_x else 0)
    two_q = check_split(C, c2, s_inv, zero, s_inv2, zero2)
    if two_q and log2:
        raise ValueError("split input: c2 is for uniform codes, not log2")
    c_out = out.shape[2]
    if out.numel() == 0:
        return out
    grid = lambda meta: (triton.cdiv(S, meta["BLOCK_S"]), triton.cdiv(c_out, meta["BLOCK_C"]), B)
    _quantize_kernel[grid](
        x3, out, r_inv if r_inv is not None else s_inv, s_inv, zero,
        s_inv2 if two_q else s_inv, zero2 if two_q else zero, group,
        S, C, c2 if two_q else C, c_out, x3.stride(0), x3.stride(1), x3.stride(2), out.stride(0), out.stride(1),
        group_stride, x2, c1, *x2.stride(),
        BITS=bits, LOG2=log2, HAS_RINV=r_inv is not None, PACK4=pack4, TWO_Q=two_q, TWO_X=two_x,
    )
    return out
