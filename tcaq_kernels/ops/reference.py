"""The reference backend: exact integer math in plain torch, on CPU or GPU. The oracle.

Integer products are summed in float64, which is exact here: |code·code| ≤ 2^14 and any K < 2^38
keeps every partial sum below 2^53. This makes the oracle run on any device torch supports
(CUDA has no general int32 matmul) while still returning bit-exact int32 accumulators.

Split inputs (quant/state.py): each channel range i is quantized with its own (s_ai, z_i), gives
its own accumulator `acc_i = int_conv2d(q_i, w_int[:, range i], z_i)` (so a conv pads each range
with its own z_i), and `epilogue(acc1, …, skip=(acc2, s_a2))` evaluates, in fp32,

    y = (acc1·(s_w[n]·s_a1[g]) + acc2·(s_w[n]·s_a2[g])) + bias

each product rounded, then their sum, then the bias. This order is the contract: the simulate
backend reproduces it bit for bit, and the Triton backend gets it by asking the unsplit kernels
for the two bias-free products `acc_i·(s_w·s_ai)` (a single fp32 multiply each) and adding them.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from ..quant.primitives import dequantize_log2


def int_linear(a_q: torch.Tensor, w_q: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """Zero-point-corrected accumulator `Σ_k w[n,k]·(a[..,k] − z)` as int32.

    `a_q` [..., K] int8 codes, `w_q` [N, K] int8, `zero` broadcastable to a_q's leading dims + 1
    (a 0-d tensor, or per sample shaped [B, 1, …, 1]). Kernels compute it as
    `Σ w·a − z·Σ_k w`, which is the same integer.
    """
    a = a_q.double() - zero.double()
    return torch.matmul(a, w_q.double().t()).to(torch.int32)


def int_conv2d(
    a_q: torch.Tensor,
    w_q: torch.Tensor,
    zero: torch.Tensor,
    stride: Sequence[int] = (1, 1),
    padding: Sequence[int] = (0, 0),
    dilation: Sequence[int] = (1, 1),
) -> torch.Tensor:
    """Zero-point-corrected conv accumulator as int32 (NCHW).

    Padding happens in the quantized domain with the value z (DESIGN.md §3); after subtracting z
    from the codes that padding is a plain zero padding, so the correction term `z·Σw` is the same
    at every output position.
    """
    a = a_q.double() - zero.double()
    return F.conv2d(a, w_q.double(), None, tuple(stride), tuple(padding), tuple(dilation)).to(torch.int32)


def epilogue(
    acc: torch.Tensor,
    w_scale: torch.Tensor,
    a_scale: torch.Tensor,
    bias: Optional[torch.Tensor],
    channel_dim: int,
    skip: Optional[tuple[torch.Tensor, torch.Tensor]] = None,
) -> torch.Tensor:
    """`acc·(s_w[n]·s_a[g]) + bias` in fp32: the combined scale is formed first, as kernels do.

    `skip = (acc2, s_a2)`: the second range of a split input, whose product is added before the
    bias (the order in the module docstring).
    """
    shape = [1] * acc.dim()
    shape[channel_dim] = -1
    w_scale = w_scale.float().view(shape)
    y = acc.float() * (w_scale * a_scale.float())
    if skip is not None:
        y = y + skip[0].float() * (w_scale * skip[1].float())
    if bias is not None:
        y = y + bias.float().view(shape)
    return y


def int_attention_scores(q_q: torch.Tensor, k_q: torch.Tensor) -> torch.Tensor:
    """`Q_int·K_intᵀ` (symmetric codes, zero point 0) as int32, batched over leading dims."""
    return torch.matmul(q_q.double(), k_q.double().transpose(-1, -2)).to(torch.int32)


def int_pv_uniform(p_q: torch.Tensor, zero: torch.Tensor, v_q: torch.Tensor) -> torch.Tensor:
    """`Σ_j (p[i,j] − z)·v[j,d]` as int32 for uniform post-softmax codes."""
    return torch.matmul(p_q.double() - zero.double(), v_q.double()).to(torch.int32)


def pv_log2(p_code: torch.Tensor, bits: int, v_q: torch.Tensor) -> torch.Tensor:
    """`Σ_j 2^-code[i,j]·v[j,d]` (zero code → 0) in float64: exact, since every level ≥ 2^-24."""
    levels = dequantize_log2(p_code, torch.ones((), device=p_code.device), bits).double()
    return torch.matmul(levels, v_q.double())


def p_row_mass_uniform(p_q: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """`Σ_j (p[i,j] − z)` per row (keepdim), int64: the quantized mass a row-normalised P divides by."""
    return (p_q.long() - zero.long()).sum(-1, keepdim=True)


def p_row_mass_log2(p_code: torch.Tensor, bits: int) -> torch.Tensor:
    """`Σ_j 2^-code[i,j]` per row (keepdim) in float64: exact (multiples of 2^-24 summing below 2^29)."""
    levels = dequantize_log2(p_code, torch.ones((), device=p_code.device), bits).double()
    return levels.sum(-1, keepdim=True)
