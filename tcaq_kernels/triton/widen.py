"""Packed int4 weights widened to int8 once per call, ahead of the int8 GEMM / conv kernels.

Hopper has no 4-bit MMA (DESIGN.md §4): the W4A8 kernels widen each weight tile in registers and pass it
through shared memory to wgmma, which costs them more than the halved weight bytes save (W4A8 ≈ 0.5× the
W8A8 kernels' speed at every SD-1.5 shape, M = 2 included: benchmarks/results/kernels.md). So by default
`gemm.qgemm` and `conv.qconv` instead widen the layer's whole packed weight with this memory-bound pass
(`pack_int4` [R, ⌈K/2⌉] → int8 [R, K], a temporary the size of the int8 weight) and run the W8A8 kernels on
it: the embedded UNet's W4A8 step from a CUDA graph went from 2.74 / 6.82 to 2.35 / 5.66 ms at batch 64 / 256,
W8A8 2.25 / 5.46 (H200, one call: benchmarks/results/w4-widen-h200/). The model keeps its 4-bit weights; the
integers multiplied are the same, so the outputs equal the in-loop widening's bit for bit.
`TCAQ_W4_WIDEN=0` keeps the in-loop widening (A/B runs).
"""
import os

import torch
import triton
import triton.language as tl

from .numerics import unpack_int4_rows

#: Whether W4 GEMMs and convs widen their weights per call (`widen_int4`) and run the int8 kernels.
WIDEN = os.environ.get("TCAQ_W4_WIDEN", "1") != "0"


@triton.jit
def _widen_int4_kernel(p_ptr, out_ptr, R, K, KP, BLOCK_R: tl.constexpr, BLOCK_J: tl.constexpr):
    """A BLOCK_R × BLOCK_J tile of packed bytes → BLOCK_R × 2·BLOCK_J int8 values (low nibble first, as
    `pack_int4` stores them) by the kernels' own `unpack_int4_rows`; a row's padding nibble (odd K) is not
    stored."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    j = tl.program_id(1) * BLOCK_J + tl.arange(0, BLOCK_J)
    r_mask = (rows < R)[:, None]
    p = tl.load(p_ptr + rows[:, None].to(tl.int64) * KP + j[None, :], mask=r_mask & (j < KP)[None, :], other=0)
    k = tl.program_id(1) * 2 * BLOCK_J + tl.arange(0, 2 * BLOCK_J)
    tl.store(out_ptr + rows[:, None].to(tl.int64) * K + k[None, :], unpack_int4_rows(p, BLOCK_R, 2 * BLOCK_J),
             mask=r_mask & (k < K)[None, :])


def widen_int4(packed: torch.Tensor, length: int) -> torch.Tensor:
    """`unpack_int4(packed, length)` in one kernel: uint8 [..., ⌈length/2⌉] (contiguous) → int8 [..., length]."""
    if packed.dtype != torch.uint8 or not packed.is_contiguous():
        raise ValueError(f"widen_int4: expects contiguous uint8 packed codes, got {packed.dtype} "
                         f"{tuple(packed.shape)} strides {packed.stride()}")
    kp = packed.shape[-1]
    if kp != (length + 1) // 2:
        raise ValueError(f"widen_int4: {kp} packed bytes a row do not hold {length} codes")
    out = torch.empty((*packed.shape[:-1], length), dtype=torch.int8, device=packed.device)
    if out.numel() == 0:
        return out
    rows = packed.numel() // kp
    block_j = min(triton.next_power_of_2(kp), 512)
    block_r = max(1, 4096 // block_j)
    _widen_int4_kernel[(triton.cdiv(rows, block_r), triton.cdiv(kp, block_j))](
        packed, out, rows, length, kp, BLOCK_R=block_r, BLOCK_J=block_j, num_warps=4)
    return out
