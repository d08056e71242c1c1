"""Quantizer math as plain torch functions: the single source of truth for numerics.

Every backend (simulate, reference, Triton, CUDA) computes exactly what these functions define
(DESIGN.md §3). Conventions fixed here, and relied on by the kernels:

* Rounding is round-half-to-even (`torch.round`, CUDA/Triton `rint`).
* Activation codes are *signed*: `q = clamp(rint(x·(1/r)·(1/s)) + z, -2^(b-1), 2^(b-1)-1)`. This is
  DESIGN.md's unsigned `[0, 2^b-1]` code shifted by `-2^(b-1)` (and `z` with it), so codes fit
  int8 tensor-core operands; `q - z` and therefore every GEMM result is unchanged.
* The activation quantize multiplies by fp32 reciprocals in this order: `(x · r_inv) · s_inv`.
  Kernels must use the same two roundings to produce the same integers.
* Weights are symmetric per output channel: `w_int = clamp(rint(w·r / s_w), -2^(b-1), 2^(b-1)-1)`
  with `s_w = max|w·r| / (2^(b-1)-1)`. 4-bit weights are packed two per byte (`pack_int4`).
* log2 codes: `code = clamp(rint(-log2(x/s)), 0, L)`, `x̂ = s·2^-code`, L = min(2^b-2, 24). The top
  code `2^b-1` is reserved for zero: it encodes x ≤ 0 and anything that rounds below level L.
  L ≤ 24 keeps every level an exact fp16 number (2^-24 is its smallest subnormal), so P·V can run on
  fp16 tensor cores exactly. The rounding is computed from the fp32 bit pattern (exponent, and
  mantissa against √2), so no backend's log2 approximation can move a code.
* Attention output with row-normalised P (`p_row_norm`, CalibState v3): each row of the quantized
  map is divided by its own quantized mass, `O = s_v·Σ_j p̂_j·v_j / Σ_j p̂_j` with p̂ in units of s_p
  (c − z, or 2^-c), so s_p cancels; a row whose mass is ≤ 0 keeps the plain factor s_p·s_v
  (`attention_row_scale`).
* Row-max maps (`p_row_max`, CalibState v4): the map quantized is e = exp(S − max_j S) ∈ (0, 1], not
  the softmax, and the output is normalised by the float row sum afterwards: with y = e·s_inv (the
  value each code is rounded from, p̂ ≈ y in units of s_p), `O = s_v·Σ_j p̂_j·v_j / Σ_j y_j` — the
  dequantized e over its exact sum, `attention_row_scale(Σ_j y_j, s_p, s_v)`. With `p_row_norm` as
  well, the quantized mass replaces Σ_j y_j as above.
"""
from __future__ import annotations

from typing import Optional

import torch

WEIGHT_BITS = (4, 6, 8)
ACT_BITS = (4, 6, 8)
LOG2_MAX_LEVEL = 24
# Mantissa field of fp32 values whose mantissa (1.m) is below √2: 1.m < √2  ⇔  m_field ≤ 0x3504F3.
_SQRT2_MANTISSA = 0x3504F3


def qrange(bits: int) -> tuple[int, int]:
    """Signed integer range of a b-bit code."""
    return -(1 << (bits - 1)), (1 << (bits - 1)) - 1


def ste(value: torch.Tensor, surrogate: torch.Tensor) -> torch.Tensor:
    """Straight-through: forward is exactly `value`, the gradient is that of `surrogate`."""
    return value + (surrogate - surrogate.detach())


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """Round half-to-even in the forward pass, identity gradient (straight-through estimator)."""
    return ste(torch.round(x), x)


# ----------------------------------------------------------------------------------------- weights


def weight_scale_symmetric(w: torch.Tensor, bits: int, r: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Per-output-channel symmetric scale of `w·r` (r broadcast over input channels, dim 1).

    All-zero channels get scale 1 so that the scale stays positive and the codes stay 0.
    """
    wr = _apply_in_channel(w, r)
    amax = wr.detach().abs().flatten(1).amax(dim=1).float()
    scale = amax / qrange(bits)[1]
    return torch.where(amax > 0, scale, torch.ones_like(scale))


def quantize_weight(
    w: torch.Tensor, scale: torch.Tensor, bits: int, r: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """Integer weights (int8 container) of `w·r` with per-output-channel `scale`, nearest rounding."""
    qmin, qmax = qrange(bits)
    wr = _apply_in_channel(w.float(), r)
    s = scale.float().view(-1, *([1] * (w.dim() - 1)))
    return torch.clamp(torch.round(wr / s), qmin, qmax).to(torch.int8)


def dequantize_weight(w_int: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """`w_int·s_w` — the weight the integer model effectively uses (in the TCR-scaled basis)."""
    return w_int.float() * scale.float().view(-1, *([1] * (w_int.dim() - 1)))


def _apply_in_channel(w: torch.Tensor, r: Optional[torch.Tensor]) -> torch.Tensor:
    if r is None:
        return w
    return w * r.to(w.dtype).view(1, -1, *([1] * (w.dim() - 2)))


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """Pack signed 4-bit codes along the last dim: element 2i → low nibble, 2i+1 → high nibble.

    An odd last dim is padded with a zero nibble; `unpack_int4` needs the original length.
    """
    if q.dtype != torch.int8:
        raise TypeError(f"pack_int4 expects int8 codes, got {q.dtype}")
    if q.numel() and (q.min() < -8 or q.max() > 7):
        raise ValueError("pack_int4: codes outside the 4-bit range [-8, 7]")
    if q.shape[-1] % 2:
        q = torch.nn.functional.pad(q, (0, 1))
    nib = (q.to(torch.int16) & 0xF).to(torch.uint8)
    return nib[..., 0::2] | (nib[..., 1::2] << 4)


def unpack_int4(packed: torch.Tensor, length: int) -> torch.Tensor:
    """Inverse of `pack_int4`: sign-extend each nibble back to int8 and drop the padding."""
    if packed.dtype != torch.uint8:
        raise TypeError(f"unpack_int4 expects uint8, got {packed.dtype}")
    p = packed.to(torch.int16)
    lo, hi = p & 0xF, (p >> 4) & 0xF
    both = torch.stack((lo, hi), dim=-1).flatten(-2)[..., :length]
    return torch.where(both >= 8, both - 16, both).to(torch.int8)


# ------------------------------------------------------------------------------ uniform activations


def qparams_from_range(xmin: torch.Tensor, xmax: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Asymmetric (scale, signed zero point) covering [min(xmin,0), max(xmax,0)].

    The range always contains 0 so that zero (conv padding) is exactly representable by `z`.
    A degenerate range gets scale 1 (codes are then all z).
    """
    qmin, qmax = qrange(bits)
    lo = torch.clamp(torch.as_tensor(xmin, dtype=torch.float32), max=0.0)
    hi = torch.clamp(torch.as_tensor(xmax, dtype=torch.float32), min=0.0)
    span = hi - lo
    scale = torch.where(span > 0, span / (qmax - qmin), torch.ones_like(span))
    zero = torch.clamp(qmin - torch.round(lo / scale), qmin, qmax).to(torch.int32)
    return scale, zero


def qparams_symmetric(amax: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric (scale, zero=0) for a signed tensor with absolute maximum `amax`."""
    amax = torch.as_tensor(amax, dtype=torch.float32)
    scale = torch.where(amax > 0, amax / qrange(bits)[1], torch.ones_like(amax))
    return scale, torch.zeros_like(scale, dtype=torch.int32)


def scale_input(
    x: torch.Tensor, s_inv: torch.Tensor, r_inv: Optional[torch.Tensor] = None, channel_dim: int = 1
) -> torch.Tensor:
    """`(x·r_inv)·s_inv` in fp32 — the value that is rounded to a code, in the order kernels use."""
    u = x.float()
    if r_inv is not None:
        u = u * _channel_view(r_inv, x.dim(), channel_dim)
    return u * s_inv.float()


def quantize_uniform(
    x: torch.Tensor,
    s_inv: torch.Tensor,
    zero: torch.Tensor,
    bits: int,
    r_inv: Optional[torch.Tensor] = None,
    channel_dim: int = 1,
) -> torch.Tensor:
    """Signed activation codes (int8): `clamp(rint((x·r_inv)·s_inv) + z)`, all in fp32.

    `s_inv`/`zero` broadcast against `x` (per-tensor scalars, or per-sample shaped by the caller);
    `r_inv` is the per-channel TCR reciprocal along `channel_dim`.
    """
    qmin, qmax = qrange(bits)
    u = torch.round(scale_input(x, s_inv, r_inv, channel_dim)) + zero.float()
    return torch.clamp(u, qmin, qmax).to(torch.int8)


def dequantize_uniform(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """`(q - z)·s` in fp32 (the TCR factor stays folded in the weights)."""
    return (q.float() - zero.float()) * scale.float()


def fake_quant_uniform(
    x: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor,
    bits: int,
    r_inv: Optional[torch.Tensor] = None,
    channel_dim: int = 1,
) -> torch.Tensor:
    """Differentiable fake quant: `(q - z)·s` with STE rounding (LSQ-style gradient reaches `scale`).

    The result lives in the TCR-scaled basis (≈ x / r), i.e. it multiplies the TCR-folded weights.
    It rounds exactly like `quantize_uniform` (same reciprocals, same order), so for a fixed
    `scale` its codes are the integer path's codes, bit for bit.
    """
    qmin, qmax = qrange(bits)
    q = torch.clamp(round_ste(scale_input(x, 1.0 / scale, r_inv, channel_dim)) + zero.float(), qmin, qmax)
    return (q - zero.float()) * scale


def _channel_view(v: torch.Tensor, ndim: int, dim: int) -> torch.Tensor:
    shape = [1] * ndim
    shape[dim] = -1
    return v.float().view(shape)


# ---------------------------------------------------------------------------------- log2 activations


def log2_levels(bits: int) -> int:
    """Largest exponent level L of a b-bit log2 quantizer (levels 2^0 … 2^-L, plus the zero code)."""
    return min((1 << bits) - 2, LOG2_MAX_LEVEL)


def log2_zero_code(bits: int) -> int:
    """The reserved code that decodes to 0."""
    return (1 << bits) - 1


def quantize_log2(x: torch.Tensor, s_inv: torch.Tensor, bits: int) -> torch.Tensor:
    """log2 codes (uint8) of non-negative `x` (post-softmax maps) with scale `s` (given as 1/s).

    The nearest level in the log domain is read off the fp32 bits of `y = x·s_inv`: with
    y = 1.m·2^e, `rint(-log2 y) = -e - [1.m ≥ √2]` (no ties exist in fp32).
    """
    y = x.float() * s_inv.float()
    bits32 = y.contiguous().view(torch.int32)
    exponent = ((bits32 >> 23) & 0xFF) - 127
    above_sqrt2 = ((bits32 & 0x7FFFFF) > _SQRT2_MANTISSA).to(torch.int32)
    code = torch.clamp(-exponent - above_sqrt2, min=0)
    level_max = log2_levels(bits)
    is_zero = ~(y > 0) | (code > level_max)  # also NaN
    code = torch.where(is_zero, torch.full_like(code, log2_zero_code(bits)), code)
    return code.to(torch.uint8)


def dequantize_log2(code: torch.Tensor, scale: torch.Tensor, bits: int) -> torch.Tensor:
    """`s·2^-code`, and 0 for the zero code."""
    c = code.to(torch.int32)
    val = scale.float() * torch.exp2(-c.float())
    return torch.where(c == log2_zero_code(bits), torch.zeros_like(val), val)


def fake_quant_log2(x: torch.Tensor, scale: torch.Tensor, bits: int) -> torch.Tensor:
    """log2 fake quant with a straight-through gradient for `x` (scale is a searched constant)."""
    return ste(dequantize_log2(quantize_log2(x.detach(), 1.0 / scale.float(), bits), scale, bits), x)


def row_max_exp(scores: torch.Tensor) -> torch.Tensor:
    """exp(S − max_j S) per row of fp32 scores: the post-softmax map of a `p_row_max` layer (each
    row's largest entry exactly 1; the softmax is this over its row sum).

    Why: quantizing the softmax itself needs each row's final sum before the first code, so a fused
    kernel computes every exponential twice (once for the sum, once for the codes); a row's max comes
    from the int32 scores alone, so this map needs one exponential per score and the sum is
    accumulated beside P·V (benchmarks/results/kernels.md, attention rows)."""
    return torch.exp(scores - scores.amax(-1, keepdim=True))


def attention_row_scale(row_mass: torch.Tensor, s_p: torch.Tensor, s_v: torch.Tensor) -> torch.Tensor:
    """The fp32 factor that turns a row's P·V accumulator (P in units of s_p) into the output when P
    is row-normalised: `s_v / mass` (one correctly rounded fp32 division), or `s_p·s_v` where the row's
    quantized mass is not positive (every code at the zero point / the zero code: the accumulator is
    then 0 for log2 and for z = 0, the output what the unnormalised map gives).

    Why normalise: a quantized map's rows no longer sum to 1 — rounding the many small probabilities of
    a long row down (6- or 4-bit uniform, or log2's coarse steps) removes mass, and every attention
    output shrinks towards 0 with it; the samples fade. Dividing by the quantized mass restores the
    convex combination at no cost in a fused kernel (benchmarks/results/attention_row_mass.md).
    """
    mass = row_mass.float()
    safe = torch.where(mass > 0, mass, torch.ones_like(mass))
    return torch.where(mass > 0, s_v.float() / safe, s_p.float() * s_v.float())


# --------------------------------------------------------------------------------- choose qparams


def qparams_minmax(x: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Asymmetric qparams covering the full observed range."""
    return qparams_from_range(x.min(), x.max(), bits)


def qparams_percentile(x: torch.Tensor, bits: int, pct: float = 99.99) -> tuple[torch.Tensor, torch.Tensor]:
    """Asymmetric qparams clipping the tails at the given percentile (and its mirror)."""
    flat = x.detach().flatten().float()
    if flat.numel() > 1 << 24:  # torch.quantile's input limit; a strided subsample is plenty
        flat = flat[:: flat.numel() // (1 << 24) + 1]
    q = torch.tensor([1 - pct / 100, pct / 100], dtype=flat.dtype)
    lo, hi = torch.quantile(flat, q.to(flat.device))
    return qparams_from_range(lo, hi, bits)


def candidate_chunks(candidates: int, per_candidate: int, budget: int = 1 << 24) -> list[tuple[int, int]]:
    """Ranges of candidates whose broadcast error tensor stays under `budget` elements."""
    step = max(1, budget // max(1, per_candidate))
    return [(lo, min(lo + step, candidates)) for lo in range(0, candidates, step)]


def qparams_mse(x: torch.Tensor, bits: int, grid: int = 80, min_ratio: float = 0.3) -> tuple[torch.Tensor, torch.Tensor]:
    """Asymmetric qparams minimising ‖x − x̂‖² over clipping ratios of the observed range.

    Every candidate is evaluated at once (in memory-bounded chunks): calibration calls this per
    quantizer, timestep group and TCR strength, thousands of times. Ties keep the smallest ratio.
    """
    x = x.detach().float().flatten()
    qmin, qmax = qrange(bits)
    ratios = torch.linspace(min_ratio, 1.0, grid).to(x.device)
    scale, zero = qparams_from_range(x.min() * ratios, x.max() * ratios, bits)
    s_inv, zf = (1.0 / scale)[:, None], zero.float()[:, None]
    errs = []
    for lo, hi in candidate_chunks(grid, x.numel()):
        q = torch.clamp(torch.round(x[None] * s_inv[lo:hi]) + zf[lo:hi], qmin, qmax)
        errs.append(((q - zf[lo:hi]) * scale[lo:hi, None] - x[None]).pow(2).mean(dim=1))
    best = int(torch.cat(errs).argmin())
    return scale[best], zero[best]


def log2_scale_mse(x: torch.Tensor, bits: int, candidates: int = 16) -> torch.Tensor:
    """log2 scale minimising ‖x − x̂‖²; searched over `max(x)·2^(-k/4)`, k = 0 … candidates-1."""
    x = x.detach().float()
    top = torch.clamp(x.max(), min=torch.finfo(torch.float32).tiny)
    best, best_err = top, float("inf")
    for k in range(candidates):
        s = top * 2.0 ** (-k / 4)
        err = (dequantize_log2(quantize_log2(x, 1.0 / s, bits), s, bits) - x).pow(2).mean().item()
        if err < best_err:
            best, best_err = s, err
    return best.reshape(())
