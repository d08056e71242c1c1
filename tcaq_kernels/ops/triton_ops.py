"""The `triton` backend: quantize, quantized linear and quantized conv as `torch.library` custom ops.

Each op computes DESIGN.md §3 exactly (the integers of `quant/primitives.py`, the epilogue of
`ops/reference.py`) and reads the timestep-indexed tables on the device: nothing syncs with the
host, so a sampling loop can be captured in one CUDA graph. Every op has a fake (meta)
implementation, so `torch.compile` traces through it.

Tables of a quantized layer with G timestep groups: `s_inv[G]` fp32 (1/s_a), `scale[G]` fp32
(s_a), `zero[G]` int32 (signed zero point). `group` is an int tensor (int32 or int64) of shape [B]
(one entry per sample), or of one element when every sample shares the group; sample b of the
batch uses `table[group[b]]`.

Signatures (registered as `tcaq::triton_quantize_act`, `tcaq::triton_geglu_quantize`,
`tcaq::triton_layernorm_quantize`, `tcaq::triton_groupnorm_silu_quantize`, `tcaq::triton_groupnorm`,
`tcaq::triton_qlinear`, `tcaq::triton_qconv2d`, `tcaq::triton_qattention`):

    quantize_act(x, s_inv, zero, group, bits=8, r_inv=None, mode="uniform", pack4=False,
                 channel_dim=-1) -> codes
        x [B, …] float; `channel_dim` is moved last: NCHW in → NHWC codes [B, H, W, C] out,
        [..., K] in → [..., K] out. mode "uniform": int8 signed codes (r_inv[C] the TCR
        reciprocal, optional); pack4 (bits ≤ 4) → uint8 [..., ⌈C/2⌉], low nibble = even channel.
        mode "log2": uint8 codes of `quantize_log2` (zero may be None, r_inv must be None).

    geglu_quantize(h, s_inv, zero, group, bits=8, r_inv=None) -> codes [..., F] int8
        A diffusers GEGLU's output `h[..., :F] · gelu(h[..., F:])` (h [..., 2F] float, the projection's
        output, any strides) quantized for the linear that reads it (its uniform tables, r_inv[F]), one
        pass (triton/geglu.py): the codes `quantize_act` would give of diffusers' own product.

    layernorm_quantize(x, weight, bias, eps, s_inv, zero, group, bits=8, r_inv=None) -> codes [..., C] int8
        `layer_norm(x)` over the last dim (x [..., C] float, channels contiguous; weight/bias [C] or both None)
        quantized for the linear that reads it (its uniform tables, r_inv[C]), one pass (triton/layernorm.py);
        rows split between the samples as qlinear's. Statistics in another order than torch's: a code may
        differ by one within fp32 rounding of a rounding boundary.

    groupnorm_silu_quantize(x, weight, bias, num_groups, eps, s_inv, zero, group, bits=8, r_inv=None,
                            c2=None, s_inv2=None, zero2=None, x2=None, silu=True)
            -> codes [B, H, W, C] int8
        A ResBlock's `silu(group_norm(x))` quantized for the next conv, one pass after the statistics
        (triton/groupnorm.py): x float [B, C, H, W] in any memory format; weight/bias [C] (or both
        None); uniform codes of the conv's quantizer (its s_inv/zero tables, r_inv[C]), in the NHWC
        layout `qconv2d` takes. Statistics are fp32 but not summed in torch's order: a code may
        differ by one where the value lies within fp32 rounding of a rounding boundary. A split input
        (c2, s_inv2, zero2): channels [c2, C) get the second quantizer's codes, as qconv2d's split reads them.
        `silu=False`: the codes of group_norm(x) alone (a transformer block's norm → proj_in).

    groupnorm(x, weight, bias, num_groups, eps, silu=False) -> y [B, S, C] contiguous, x's dtype
        A plain GroupNorm of x [B, S, C] (channels last, any strides: an attention block's tokens) with
        the same kernels, fp32 statistics and affine: the layout its q/k/v projections read; `silu`
        applies SiLU after it in fp32 (the UNet's final norm before conv_out).

    qlinear(x, w_q, w_sum, w_scale, bias, s_inv, scale, zero, group, a_bits=8, r_inv=None,
            residual=None, out_dtype=None, split_k=None, out_s_inv=None, out_zero=None,
            out_r_inv=None, out_bits=8) -> y [..., N]
        x [..., K]: float activations, quantized in the GEMM prologue (one kernel), or int8 codes
        from `quantize_act`. (w_q, w_sum) from `prepare_linear_weight(w_int, bits)`: int8 [N, K]
        or packed int4 uint8 [N, ⌈K/2⌉]; w_scale [N] fp32; bias [N] or None; residual [..., N] or
        None (added after the bias). Rows of sample b are the M/B consecutive rows of x's
        flattened leading dims (B = group.numel()). out_dtype defaults to x's float dtype
        (bfloat16 for int8 input). split_k: None lets `choose_split_k` split the K loop when the
        output tiles cannot fill the GPU (small M) — only with TCAQ_AUTO_SPLIT_K=1 until the split
        kernels are measured on a GPU (triton/gemm.py AUTO_SPLIT_K) —; 1 never splits; n > 1 forces
        n splits. int32 partial sums are added exactly, so the result does not depend on it.
        Quantized output: given the next layer's tables out_s_inv[G] / out_zero[G] (with its TCR
        reciprocal out_r_inv[N], optional, and width out_bits ≤ 8; out_dtype then stays None), the
        epilogue returns int8 codes [..., N] — `quantize_uniform` of the fp32 y, the int8 input of
        that layer — instead of y.

    qconv2d(x, w_q, w_sum, w_scale, bias, s_inv, scale, zero, group, stride, padding,
            a_bits=8, r_inv=None, residual=None, out_dtype=None, split_k=None, out_s_inv=None,
            out_zero=None, out_r_inv=None, out_bits=8, c2=None, w_q2=None, w_sum2=None, s_inv2=None,
            scale2=None, zero2=None, upsample=1)
            -> y [B, N, OH, OW] channels_last, or int8 codes [B, OH, OW, N]
        x: float NCHW [B, C, H, W] in any memory format (quantized to NHWC codes first: two
        kernels), or int8 NHWC codes [B, H, W, C] from `quantize_act(..., channel_dim=1)` or
        `groupnorm_silu_quantize` (no quantize pass; s_inv and r_inv are then unused).
        (w_q, w_sum) from `prepare_conv_weight(w_int [N, C, KH, KW], bits, padding)`: int8 [N, KH, KW, C]
        or packed uint8 [N, KH, KW, ⌈C/2⌉], and the weight sums of that padding's clipped filters, int32
        [pt+1, pb+1, pl+1, pr+1, N] (one of a narrower padding is refused). stride: int; padding: [p],
        [ph, pw] or [top, bottom, left, right], filled with the code z[g]. residual: NCHW-shaped
        [B, N, OH, OW], any memory format.
        split_k: like qlinear's, over the reduction taps × C (`triton/conv.conv_split_k`): None
        splits when the output tiles cannot fill the GPU (deep layers at small batch), 1 never,
        n > 1 up to n ways; the result does not depend on it. out_s_inv / out_zero / out_r_inv /
        out_bits: the quantized output, as qlinear's; the codes come NHWC [B, OH, OW, N], the layout
        qconv2d takes as int8 input.
        A split input (an up block's skip concatenation, quant/state.py `input_split`): input channels
        [c2, C) have their own quantizer (s_inv2, scale2, zero2 tables; same bits; r_inv still covers
        all C) and their own weights (w_q2, w_sum2) = `prepare_conv_weight` of w_int[:, c2:], while
        (w_q, w_sum) then hold w_int[:, :c2]. One kernel keeps an int32 sum per range and returns
        acc₁·(s_w·s_a₁) + acc₂·(s_w·s_a₂) + bias (ops/reference.py's order); codes input is then the
        whole [B, H, W, C] (e.g. `groupnorm_silu_quantize` with the same c2). No split-K with it.
        upsample=2: the conv runs over the nearest-neighbour 2× upsampling of x (a diffusers Upsample2D's
        interpolate + conv), reading x's own codes at (ih // 2, iw // 2): the output is 2H × 2W-based,
        the upsampled tensor never exists, and the codes are those of the upsampled input exactly.

    qattention(q, k, v, softmax_scale, q_s_inv, q_scale, q_zero, k_s_inv, k_scale, k_zero,
               v_s_inv, v_scale, v_zero, p_s_inv, p_scale, p_zero, p_kind_ids, group,
               q_bits=8, k_bits=8, v_bits=8, p_bits=8, p_row_norm=False, p_row_max=False,
               p_kinds=3, out_dtype=None) -> out [B, heads, Lq, d]
        `QAttnProcessor.attention` without a mask (triton/attention.py): q [B, heads, Lq, d],
        k, v [B, heads, Lk, d] float, any strides; head dim ≤ 256. q/k/v are quantized
        (uniform, their tables), P per group with the kind `p_kind_ids[g]` (0 uniform, 1 log2);
        p_row_norm divides each output row by its quantized P mass (CalibState v3); p_row_max quantizes
        exp(S − row max) and divides by its row sum (v4: one exponential per score). p_kinds: the
        P kinds p_kind_ids holds, bits 1 uniform | 2 log2 (the default 3, both, is always safe; a
        layer whose groups are all one kind passes that bit alone, and the v operand of the other
        kind is not written). out_dtype defaults to q's dtype. Two kernels: q/k/v quantize, then
        the fused attention.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from ..triton.attention import check_shapes, qattention_launch
from ..triton.conv import conv_output_size, conv_pads, prepare_conv_weight, qconv
from ..triton.geglu import geglu_quantize_bsc
from ..triton.gemm import prepare_linear_weight, qgemm
from ..triton.groupnorm import groupnorm_bsc, groupnorm_silu_quantize_bsc
from ..triton.layernorm import layernorm_quantize_2d
from ..triton.quantize import quantize_bsc

__all__ = ["quantize_act", "geglu_quantize", "layernorm_quantize", "groupnorm_silu_quantize", "groupnorm", "qlinear",
           "qconv2d", "qattention", "call", "prepare_linear_weight", "prepare_conv_weight"]


_IMPLS: dict = {}  # custom op → the Python function it wraps


def _custom_op(name: str):
    """`torch.library.custom_op(name)` over the function, which `call` can also run directly."""
    def wrap(fn):
        op = torch.library.custom_op(name, mutates_args=())(fn)
        _IMPLS[op] = fn
        return op
    return wrap


def call(op, x: torch.Tensor, *args, **kwargs):
    """`op(x, …)` as the layers make it: through the dispatcher while anything traces (torch.compile or
    export; fake or other tensor subclasses), else the op's Python function directly. An eager UNet step
    makes one or two such calls per layer, and the dispatcher round trip of a Python custom op is a
    good share of each: benchmarks/host_overhead.py measured a step of the embedded model (launches
    stubbed, 2-core CPU) at 52.9 ms through the ops and 44.3 ms direct. Anything that is not one of
    this module's ops (a test's stand-in, say) is called as it is."""
    impl = _IMPLS.get(op)
    if impl is not None and type(x) is torch.Tensor and not torch.compiler.is_compiling():
        return impl(x, *args, **kwargs)
    return op(x, *args, **kwargs)


def _group_layout(group: torch.Tensor, batch: int) -> tuple[int, int]:
    """(number of samples B, stride into `group`): stride 0 when one group serves the batch."""
    if group.numel() == 1:
        return batch, 0
    if group.dim() != 1:
        raise ValueError(f"group must have shape [B] or one element, got {tuple(group.shape)}")
    return group.numel(), group.stride(0)


def _float_out(x: torch.Tensor, out_dtype: Optional[torch.dtype]) -> torch.dtype:
    if out_dtype is not None:
        return out_dtype
    return x.dtype if x.is_floating_point() else torch.bfloat16


def _require_dense(op: str, **tensors: Optional[torch.Tensor]) -> None:
    """Tables and per-channel vectors are read by raw index in the kernels, so a strided view (say
    `s.expand(G)`, stride 0) would be read past its storage: refuse it by name instead."""
    for name, t in tensors.items():
        if t is not None and not t.is_contiguous():
            raise ValueError(f"{op}: {name} must be contiguous (the kernel indexes it directly), got shape "
                             f"{tuple(t.shape)} with strides {t.stride()}; pass {name}.contiguous()")


def _output_dtype(x: torch.Tensor, out_dtype: Optional[torch.dtype], N: int, out_s_inv: Optional[torch.Tensor],
              out_zero: Optional[torch.Tensor], out_r_inv: Optional[torch.Tensor], out_bits: int) -> torch.dtype:
    """Output dtype of qlinear / qconv2d: int8 when the next layer's quantizer is given (its
    arguments checked here, so that the real and the fake implementation refuse the same calls),
    else the float one."""
    if out_s_inv is None:
        if out_zero is not None or out_r_inv is not None or out_bits != 8:
            raise ValueError("out_zero, out_r_inv and out_bits belong to the quantized output, which needs out_s_inv")
        return _float_out(x, out_dtype)
    if out_zero is None:
        raise ValueError("out_zero missing: the quantized output needs the next layer's zero-point table")
    if out_dtype is not None:
        raise ValueError(f"out_dtype={out_dtype} with out_s_inv: the quantized output is int8 codes")
    if not 2 <= out_bits <= 8:
        raise ValueError(f"out_bits must be in [2, 8] (the codes are int8), got {out_bits}")
    if out_s_inv.dim() != 1 or out_zero.shape != out_s_inv.shape:
        raise ValueError(f"out_s_inv and out_zero must be tables [G] of one length, got "
                         f"{tuple(out_s_inv.shape)} and {tuple(out_zero.shape)}")
    if out_r_inv is not None and tuple(out_r_inv.shape) != (N,):
        raise ValueError(f"out_r_inv must have one entry per output channel [{N}], got {tuple(out_r_inv.shape)}")
    return torch.int8


# ------------------------------------------------------------------------------------ quantize_act


def _quantize_shape(x: torch.Tensor, channel_dim: int, pack4: bool) -> list[int]:
    shape = list(x.movedim(channel_dim, -1).shape)
    if pack4:
        shape[-1] = (shape[-1] + 1) // 2
    return shape


@_custom_op("tcaq::triton_quantize_act")
def quantize_act(
    x: torch.Tensor,
    s_inv: torch.Tensor,
    zero: Optional[torch.Tensor],
    group: torch.Tensor,
    bits: int = 8,
    r_inv: Optional[torch.Tensor] = None,
    mode: str = "uniform",
    pack4: bool = False,
    channel_dim: int = -1,
) -> torch.Tensor:
    """Activation codes of `x` with the group's parameters; `channel_dim` moved last (see module doc)."""
    if mode not in ("uniform", "log2"):
        raise ValueError(f"mode must be 'uniform' or 'log2', got {mode!r}")
    log2 = mode == "log2"
    if log2 and (r_inv is not None or pack4):
        raise ValueError("log2 codes take no r_inv and are not packed")
    if pack4 and bits > 4:
        raise ValueError("pack4 needs bits <= 4")
    if not log2 and zero is None:
        raise ValueError("uniform quantization needs the zero-point table")
    xc = x.movedim(channel_dim, -1)
    batch, gstride = _group_layout(group, xc.shape[0] if xc.dim() > 1 else 1)
    x3 = xc.reshape(batch, -1, xc.shape[-1])
    shape = _quantize_shape(x, channel_dim, pack4)
    out = torch.empty(shape, dtype=torch.uint8 if (log2 or pack4) else torch.int8, device=x.device)
    quantize_bsc(x3, s_inv, zero if zero is not None else group, group, gstride, bits, r_inv, log2, pack4,
                 out.view(batch, -1, shape[-1]))
    return out


@quantize_act.register_fake
def _(x, s_inv, zero, group, bits=8, r_inv=None, mode="uniform", pack4=False, channel_dim=-1):
    dtype = torch.uint8 if (mode == "log2" or pack4) else torch.int8
    return x.new_empty(_quantize_shape(x, channel_dim, pack4), dtype=dtype)


# ------------------------------------------------------------------------------------ geglu_quantize


def _geglu_shape(h: torch.Tensor) -> list[int]:
    if h.dim() < 2 or h.shape[-1] % 2 or not h.is_floating_point():
        raise ValueError(f"geglu_quantize expects float h [..., 2F], got {tuple(h.shape)} {h.dtype}")
    return [*h.shape[:-1], h.shape[-1] // 2]


@_custom_op("tcaq::triton_geglu_quantize")
def geglu_quantize(
    h: torch.Tensor,
    s_inv: torch.Tensor,
    zero: torch.Tensor,
    group: torch.Tensor,
    bits: int = 8,
    r_inv: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """int8 codes of diffusers' GEGLU output `a · gelu(gate)` of h = [a, gate] (see module doc)."""
    shape = _geglu_shape(h)
    batch, gstride = _group_layout(group, h.shape[0])
    if (h.numel() // max(h.shape[-1], 1)) % batch:
        raise ValueError(f"geglu_quantize: the rows of h {tuple(h.shape)} do not split into {batch} samples")
    _require_dense("geglu_quantize", s_inv=s_inv, zero=zero, r_inv=r_inv)
    out = torch.empty(shape, dtype=torch.int8, device=h.device)
    geglu_quantize_bsc(h.reshape(batch, -1, h.shape[-1]), s_inv, zero, group, gstride, bits, r_inv,
                       out.view(batch, -1, shape[-1]))
    return out


@geglu_quantize.register_fake
def _(h, s_inv, zero, group, bits=8, r_inv=None):
    return h.new_empty(_geglu_shape(h), dtype=torch.int8)


# -------------------------------------------------------------------------------- layernorm_quantize


@_custom_op("tcaq::triton_layernorm_quantize")
def layernorm_quantize(
    x: torch.Tensor,
    weight: Optional[torch.Tensor],
    bias: Optional[torch.Tensor],
    eps: float,
    s_inv: torch.Tensor,
    zero: torch.Tensor,
    group: torch.Tensor,
    bits: int = 8,
    r_inv: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """int8 codes of `layer_norm(x)` over the last dim with the next linear's quantizer (see module doc)."""
    if x.dim() < 2 or not x.is_floating_point():
        raise ValueError(f"layernorm_quantize expects float x [..., C], got {tuple(x.shape)} {x.dtype}")
    C = x.shape[-1]
    x2 = x.reshape(-1, C)
    M = x2.shape[0]
    batch, gstride = _group_layout(group, M)
    if M % batch:
        raise ValueError(f"layernorm_quantize: {M} rows do not split into {batch} samples")
    _require_dense("layernorm_quantize", weight=weight, bias=bias, s_inv=s_inv, zero=zero, r_inv=r_inv)
    out = torch.empty((M, C), dtype=torch.int8, device=x.device)
    layernorm_quantize_2d(x2, weight, bias, eps, s_inv, zero, group, gstride, M // batch, bits, r_inv, out)
    return out.view(x.shape)


@layernorm_quantize.register_fake
def _(x, weight, bias, eps, s_inv, zero, group, bits=8, r_inv=None):
    return x.new_empty(x.shape, dtype=torch.int8)


# -------------------------------------------------------------------------- groupnorm_silu_quantize


@_custom_op("tcaq::triton_groupnorm_silu_quantize")
def groupnorm_silu_quantize(
    x: torch.Tensor,
    weight: Optional[torch.Tensor],
    bias: Optional[torch.Tensor],
    num_groups: int,
    eps: float,
    s_inv: torch.Tensor,
    zero: torch.Tensor,
    group: torch.Tensor,
    bits: int = 8,
    r_inv: Optional[torch.Tensor] = None,
    c2: Optional[int] = None,
    s_inv2: Optional[torch.Tensor] = None,
    zero2: Optional[torch.Tensor] = None,
    x2: Optional[torch.Tensor] = None,
    silu: bool = True,
) -> torch.Tensor:
    """NHWC int8 codes of `silu(group_norm(x))` with the next conv's quantizer (see module doc); with `x2`
    [B, C2, H, W], of the channel concatenation `cat([x, x2], 1)`, read from the two tensors in place;
    `silu=False`: of `group_norm(x)` (a transformer block's norm before its proj_in)."""
    if x.dim() != 4:
        raise ValueError(f"groupnorm_silu_quantize expects x [B, C, H, W], got {tuple(x.shape)}")
    B, C, H, W = _concat_shape("groupnorm_silu_quantize", x, x2)
    batch, gstride = _group_layout(group, B)
    if batch != B:
        raise ValueError(f"group has {group.numel()} entries for a batch of {B}")
    out = torch.empty((B, H, W, C), dtype=torch.int8, device=x.device)
    groupnorm_silu_quantize_bsc(_bsc(x), num_groups, eps, weight, bias, s_inv, zero, group, gstride, bits, r_inv,
                                out.view(B, H * W, C), silu=silu, c2=c2, s_inv2=s_inv2, zero2=zero2,
                                x2=None if x2 is None else _bsc(x2))
    return out


@groupnorm_silu_quantize.register_fake
def _(x, weight, bias, num_groups, eps, s_inv, zero, group, bits=8, r_inv=None, c2=None, s_inv2=None, zero2=None,
      x2=None, silu=True):
    B, C, H, W = _concat_shape("groupnorm_silu_quantize", x, x2)
    return x.new_empty((B, H, W, C), dtype=torch.int8)


def _bsc(x: torch.Tensor) -> torch.Tensor:
    """[B, C, H, W] as a [B, H·W, C] view (a copy only where H and W cannot merge)."""
    B, C, H, W = x.shape
    return x.permute(0, 2, 3, 1).reshape(B, H * W, C)


def _concat_shape(op: str, x: torch.Tensor, x2: Optional[torch.Tensor]) -> tuple[int, int, int, int]:
    """Shape of `cat([x, x2], 1)` (x's without x2), checked: the kernels read the two parts in place."""
    if x2 is None:
        return tuple(x.shape)
    if x2.dim() != 4 or x2.shape[0] != x.shape[0] or x2.shape[2:] != x.shape[2:] or x2.dtype != x.dtype:
        raise ValueError(f"{op}: x2 {tuple(x2.shape)} {x2.dtype} is not the second part of a channel "
                         f"concatenation with x {tuple(x.shape)} {x.dtype}")
    B, C, H, W = x.shape
    return B, C + x2.shape[1], H, W


@_custom_op("tcaq::triton_groupnorm")
def groupnorm(x: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor], num_groups: int,
              eps: float, silu: bool = False) -> torch.Tensor:
    """GroupNorm (then SiLU, with `silu`) over the channels of x [B, S, C] into a contiguous [B, S, C]
    (see module doc)."""
    if x.dim() != 3 or not x.is_floating_point():
        raise ValueError(f"groupnorm expects float x [B, S, C], got {tuple(x.shape)} {x.dtype}")
    return groupnorm_bsc(x, num_groups, eps, weight, bias, torch.empty(x.shape, dtype=x.dtype, device=x.device),
                         silu)


@groupnorm.register_fake
def _(x, weight, bias, num_groups, eps, silu=False):
    return x.new_empty(x.shape)


# ------------------------------------------------------------------------------------------ qlinear


@_custom_op("tcaq::triton_qlinear")
def qlinear(
    x: torch.Tensor,
    w_q: torch.Tensor,
    w_sum: torch.Tensor,
    w_scale: torch.Tensor,
    bias: Optional[torch.Tensor],
    s_inv: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor,
    group: torch.Tensor,
    a_bits: int = 8,
    r_inv: Optional[torch.Tensor] = None,
    residual: Optional[torch.Tensor] = None,
    out_dtype: Optional[torch.dtype] = None,
    split_k: Optional[int] = None,
    out_s_inv: Optional[torch.Tensor] = None,
    out_zero: Optional[torch.Tensor] = None,
    out_r_inv: Optional[torch.Tensor] = None,
    out_bits: int = 8,
) -> torch.Tensor:
    """Quantized linear layer, quantize fused into the GEMM prologue (see module doc)."""
    K = x.shape[-1]
    N = w_q.shape[0]
    x2 = x.reshape(-1, K)
    M = x2.shape[0]
    batch, gstride = _group_layout(group, M)
    if M % batch:
        raise ValueError(f"{M} rows do not split into {batch} samples")
    _require_dense("qlinear", w_sum=w_sum, w_scale=w_scale, bias=bias, s_inv=s_inv, scale=scale, zero=zero, r_inv=r_inv,
                   out_s_inv=out_s_inv, out_zero=out_zero, out_r_inv=out_r_inv)
    dtype = _output_dtype(x, out_dtype, N, out_s_inv, out_zero, out_r_inv, out_bits)
    out = torch.empty((M, N), dtype=dtype, device=x.device)
    res2 = residual.reshape(M, N) if residual is not None else None
    qgemm(x2, w_q, w_sum, w_scale, bias, s_inv, scale, zero, group, gstride, max(M // batch, 1),
          a_bits, r_inv, res2, out, split_k, out_s_inv, out_zero, out_r_inv, out_bits)
    return out.view(*x.shape[:-1], N)


@qlinear.register_fake
def _(x, w_q, w_sum, w_scale, bias, s_inv, scale, zero, group, a_bits=8, r_inv=None, residual=None,
      out_dtype=None, split_k=None, out_s_inv=None, out_zero=None, out_r_inv=None, out_bits=8):
    N = w_q.shape[0]
    dtype = _output_dtype(x, out_dtype, N, out_s_inv, out_zero, out_r_inv, out_bits)
    return x.new_empty((*x.shape[:-1], N), dtype=dtype)


# ------------------------------------------------------------------------------------------ qconv2d


def _conv_out_shape(x: torch.Tensor, w_q: torch.Tensor, stride: int, padding: Sequence[int],
                    upsample: int = 1) -> list[int]:
    B = x.shape[0]
    H, W = (x.shape[1], x.shape[2]) if x.dtype == torch.int8 else (x.shape[2], x.shape[3])
    H, W = H * upsample, W * upsample
    N, KH, KW, _ = w_q.shape
    return [B, N, *conv_output_size(H, W, KH, KW, stride, conv_pads(padding, KH, KW))]


def _conv_out(x: torch.Tensor, w_q: torch.Tensor, stride: int, padding: Sequence[int],
              dtype: torch.dtype, upsample: int = 1) -> torch.Tensor:
    """qconv2d's result: float y [B, N, OH, OW] channels_last, or int8 codes NHWC [B, OH, OW, N] (the
    same memory order; the layout qconv2d takes as int8 input)."""
    B, N, OH, OW = _conv_out_shape(x, w_q, stride, padding, upsample)
    if dtype == torch.int8:
        return torch.empty((B, OH, OW, N), dtype=dtype, device=x.device)
    return torch.empty((B, N, OH, OW), dtype=dtype, device=x.device, memory_format=torch.channels_last)


@_custom_op("tcaq::triton_qconv2d")
def qconv2d(
    x: torch.Tensor,
    w_q: torch.Tensor,
    w_sum: torch.Tensor,
    w_scale: torch.Tensor,
    bias: Optional[torch.Tensor],
    s_inv: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor,
    group: torch.Tensor,
    stride: int,
    padding: list[int],
    a_bits: int = 8,
    r_inv: Optional[torch.Tensor] = None,
    residual: Optional[torch.Tensor] = None,
    out_dtype: Optional[torch.dtype] = None,
    split_k: Optional[int] = None,
    out_s_inv: Optional[torch.Tensor] = None,
    out_zero: Optional[torch.Tensor] = None,
    out_r_inv: Optional[torch.Tensor] = None,
    out_bits: int = 8,
    c2: Optional[int] = None,
    w_q2: Optional[torch.Tensor] = None,
    w_sum2: Optional[torch.Tensor] = None,
    s_inv2: Optional[torch.Tensor] = None,
    scale2: Optional[torch.Tensor] = None,
    zero2: Optional[torch.Tensor] = None,
    upsample: int = 1,
    x2: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Quantized conv2d (implicit GEMM on NHWC codes); returns a channels-last NCHW tensor, or NHWC
    int8 codes for the next layer (see module doc). A float `x` may come with `x2` [B, C2, H, W]: the conv
    then reads `cat([x, x2], 1)`, quantized from the two tensors in place."""
    batch, gstride = _group_layout(group, x.shape[0])
    if batch != x.shape[0]:
        raise ValueError(f"group has {group.numel()} entries for a batch of {x.shape[0]}")
    _require_dense("qconv2d", w_sum=w_sum, w_scale=w_scale, bias=bias, s_inv=s_inv, scale=scale, zero=zero, r_inv=r_inv,
                   out_s_inv=out_s_inv, out_zero=out_zero, out_r_inv=out_r_inv, w_sum2=w_sum2, s_inv2=s_inv2,
                   scale2=scale2, zero2=zero2)
    dtype = _output_dtype(x, out_dtype, w_q.shape[0], out_s_inv, out_zero, out_r_inv, out_bits)
    if x2 is not None and x.dtype == torch.int8:
        raise ValueError("qconv2d: x2 (the second part of a concatenation) goes with a float x, not int8 codes")
    C = x.shape[3] if x.dtype == torch.int8 else _concat_shape("qconv2d", x, x2)[1]
    second = _second_range(C, c2, w_q, w_q2, w_sum2, s_inv2, scale2, zero2)
    if x.dtype == torch.int8:
        codes = x
        c_w = w_q.shape[3] * (2 if w_q.dtype == torch.uint8 else 1)
        c_1 = C if c2 is None else c2
        if x.dim() != 4 or c_1 not in (c_w, c_w - (w_q.dtype == torch.uint8)):
            raise ValueError(f"qconv2d: int8 codes must be NHWC [B, H, W, C] with the weight's C, "
                             f"got {tuple(x.shape)} for weights {tuple(w_q.shape)}" + (f" and c2={c2}" if c2 else ""))
    else:
        B, _, H, W = x.shape
        codes = torch.empty((B, H, W, C), dtype=torch.int8, device=x.device)
        quantize_bsc(_bsc(x), s_inv, zero, group, gstride, a_bits, r_inv, False, False, codes.view(B, H * W, C),
                     c2=c2, s_inv2=s_inv2, zero2=zero2, x2=None if x2 is None else _bsc(x2))
    result = _conv_out(x, w_q, stride, padding, dtype, upsample)
    out = result.permute(0, 3, 1, 2) if dtype == torch.int8 else result  # qconv writes through NCHW indices
    qconv(codes, w_q, w_sum, w_scale, bias, scale, zero, group, gstride, stride, conv_pads(padding, *w_q.shape[1:3]),
          residual, out, split_k, out_s_inv, out_zero, out_r_inv, out_bits, second, upsample)
    return result


def _second_range(C: int, c2, w_q, w_q2, w_sum2, s_inv2, scale2, zero2) -> Optional[tuple]:
    """qconv's `second` from qconv2d's split arguments (all given, or none), checked."""
    given = {"w_q2": w_q2, "w_sum2": w_sum2, "s_inv2": s_inv2, "scale2": scale2, "zero2": zero2}
    if c2 is None:
        extra = [name for name, t in given.items() if t is not None]
        if extra:
            raise ValueError(f"qconv2d: {', '.join(extra)} belong to a split input, which needs c2")
        return None
    missing = [name for name, t in given.items() if t is None]
    if missing:
        raise ValueError(f"qconv2d: a split input (c2={c2}) needs {', '.join(missing)}")
    if not 0 < c2 < C:
        raise ValueError(f"qconv2d: c2={c2} must lie inside the input's {C} channels")
    c_w2 = w_q2.shape[3] * (2 if w_q2.dtype == torch.uint8 else 1)
    c_ok = C - c2 in (c_w2, c_w2 - (w_q2.dtype == torch.uint8))
    if w_q2.dtype != w_q.dtype or w_q2.shape[:3] != w_q.shape[:3] or not c_ok:
        raise ValueError(f"qconv2d: w_q2 {tuple(w_q2.shape)} {w_q2.dtype} is not the weights of channels [{c2}, {C}) "
                         f"beside w_q {tuple(w_q.shape)} {w_q.dtype}")
    if s_inv2.shape != scale2.shape or zero2.shape != scale2.shape:
        raise ValueError("qconv2d: s_inv2, scale2 and zero2 must be tables [G] of one length")
    return (c2, w_q2, w_sum2, scale2, zero2)


@qconv2d.register_fake
def _(x, w_q, w_sum, w_scale, bias, s_inv, scale, zero, group, stride, padding, a_bits=8,
      r_inv=None, residual=None, out_dtype=None, split_k=None, out_s_inv=None, out_zero=None, out_r_inv=None,
      out_bits=8, c2=None, w_q2=None, w_sum2=None, s_inv2=None, scale2=None, zero2=None, upsample=1, x2=None):
    return _conv_out(x, w_q, stride, padding,
                     _output_dtype(x, out_dtype, w_q.shape[0], out_s_inv, out_zero, out_r_inv, out_bits), upsample)


# --------------------------------------------------------------------------------------- qattention


@_custom_op("tcaq::triton_qattention")
def qattention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    softmax_scale: float,
    q_s_inv: torch.Tensor,
    q_scale: torch.Tensor,
    q_zero: torch.Tensor,
    k_s_inv: torch.Tensor,
    k_scale: torch.Tensor,
    k_zero: torch.Tensor,
    v_s_inv: torch.Tensor,
    v_scale: torch.Tensor,
    v_zero: torch.Tensor,
    p_s_inv: torch.Tensor,
    p_scale: torch.Tensor,
    p_zero: torch.Tensor,
    p_kind_ids: torch.Tensor,
    group: torch.Tensor,
    q_bits: int = 8,
    k_bits: int = 8,
    v_bits: int = 8,
    p_bits: int = 8,
    p_row_norm: bool = False,
    p_row_max: bool = False,
    p_kinds: int = 3,
    out_dtype: Optional[torch.dtype] = None,
) -> torch.Tensor:
    """Quantized attention softmax(QKᵀ·scale)·V, P quantized per the group's kind (see module doc);
    `p_row_norm`: each row divided by its quantized P mass instead of scaled by s_p; `p_row_max`: the
    map quantized is exp(S − row max), each row divided by its sum."""
    check_shapes(q, k, v)
    batch, gstride = _group_layout(group, q.shape[0])
    if batch != q.shape[0]:
        raise ValueError(f"group has {group.numel()} entries for a batch of {q.shape[0]}")
    out = _heads_last(q, _float_out(q, out_dtype))
    return qattention_launch(
        q, k, v, softmax_scale, (q_s_inv, q_zero, q_scale), (k_s_inv, k_zero, k_scale), (v_s_inv, v_zero, v_scale),
        (p_s_inv, p_zero, p_scale), p_kind_ids, group, gstride, (q_bits, k_bits, v_bits, p_bits), out,
        p_row_norm=p_row_norm, p_row_max=p_row_max, p_kinds=p_kinds)


@qattention.register_fake
def _(q, k, v, softmax_scale, q_s_inv, q_scale, q_zero, k_s_inv, k_scale, k_zero, v_s_inv, v_scale, v_zero,
      p_s_inv, p_scale, p_zero, p_kind_ids, group, q_bits=8, k_bits=8, v_bits=8, p_bits=8, p_row_norm=False,
      p_row_max=False, p_kinds=3, out_dtype=None):
    return _heads_last(q, _float_out(q, out_dtype))


def _heads_last(q: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """qattention's output [B, H, L, d] over [B, L, H, d] memory: `to_out` reads it as [B, L, H·d]
    without a transpose copy (the kernel writes through the strides)."""
    B, H, L, d = q.shape
    return q.new_empty((B, L, H, d), dtype=dtype).transpose(1, 2)
