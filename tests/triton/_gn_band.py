"""The reference of the fused GroupNorm + SiLU + quantize, and the band where its codes may differ.

The kernel's GroupNorm statistics are fp32 like torch's but summed in another order, and its SiLU
is another fp32 formula, so its pre-rounding value `v = (silu(y)·r_inv)·s_inv` differs from the
reference's by a few fp32 ulps of the terms that make it. A code may therefore differ by one where
the reference's v lies within that much of a rounding boundary (k + ½), and nowhere else.

The per-element bound is derived from the exact (float64) terms: the normalised value n = (x−μ)·ρ
is off by ULPS·ε·(|n|·(1 + μ²ρ²) + mean|x|·ρ) — the mean's error scales with the group's mean |x|,
the variance's relative error with 1 + μ²/σ² — then γ, β, SiLU (slope ≤ 1.1) and the two products
each add ULPS·ε of their result. Kernel and reference both sit within it of the exact value, hence 2×.
"""
import torch
import torch.nn.functional as F

from tcaq_kernels.quant import primitives as P

ULPS = 32
MAX_FLIP_RATE = 1e-3
EPS32 = torch.finfo(torch.float32).eps


def reference(x, num_groups, gamma, beta, eps, s_inv, zero, bits, r_inv, silu: bool = True):
    """(codes, pre-rounding values) of torch's fp32 group_norm → silu → `quantize_uniform`, NHWC (`silu=False`:
    without the SiLU).

    `s_inv` / `zero` broadcast against [B, C, H, W] (per-sample tables shaped [B, 1, 1, 1]).
    """
    y = F.group_norm(x.float(), num_groups, gamma, beta, eps)
    y = F.silu(y) if silu else y
    codes = P.quantize_uniform(y, s_inv, zero, bits, r_inv, 1)
    v = P.scale_input(y, s_inv, r_inv, 1)
    return codes.permute(0, 2, 3, 1), v.permute(0, 2, 3, 1)


def band(x, num_groups, gamma, beta, eps, s_inv, r_inv, silu: bool = True):
    """Per-element half-width (NHWC, code units) within which kernel and reference values may differ
    (`silu=False`: of the codes without SiLU)."""
    B, C = x.shape[:2]
    xg = x.double().reshape(B, num_groups, -1)
    mean = xg.mean(dim=2, keepdim=True)
    rstd = (xg.var(dim=2, unbiased=False, keepdim=True) + eps).rsqrt()
    n_err = (xg - mean).abs() * rstd * (1 + (mean * rstd) ** 2) + xg.abs().mean(dim=2, keepdim=True) * rstd
    n = ((xg - mean) * rstd).reshape(x.shape)
    n_err = n_err.reshape(x.shape)
    g = (gamma.double() if gamma is not None else torch.ones(C, dtype=torch.float64)).view(1, C, 1, 1)
    b = (beta.double() if beta is not None else torch.zeros(C, dtype=torch.float64)).view(1, C, 1, 1)
    y = n * g + b
    y_err = ULPS * EPS32 * (n_err * g.abs() + b.abs() + y.abs())
    act = F.silu(y) if silu else y
    mult = s_inv.double() * (r_inv.double().view(1, C, 1, 1) if r_inv is not None else 1.0)
    v_err = ((1.1 if silu else 1.0) * y_err + ULPS * EPS32 * act.abs()) * mult.abs() * (1 + 2 * ULPS * EPS32)
    return (2 * v_err).permute(0, 2, 3, 1)


def assert_codes_within_band(codes, codes_ref, v_ref, tol, what: str):
    """Codes equal the reference's except one-level flips where v_ref is within `tol` of k + ½."""
    flips = codes != codes_ref
    # the rate bound is for large tensors; on a few hundred codes one boundary flip would exceed it
    assert int(flips.sum()) <= max(2, MAX_FLIP_RATE * flips.numel()), \
        f"{what}: {int(flips.sum())} of {flips.numel()} codes differ"
    if flips.any():
        step = (codes[flips].int() - codes_ref[flips].int()).abs()
        assert (step == 1).all(), f"{what}: a code differs by {int(step.max())} levels"
        v = v_ref[flips].double()
        dist = (v - (torch.floor(v) + 0.5)).abs()
        tol = tol.to(flips.device)  # the band is computed on the CPU; the codes may live on the GPU
        off = dist > tol[flips]
        assert not off.any(), (f"{what}: code differs away from a rounding boundary "
                               f"(distance {dist[off].max():.3g} > band {tol[flips][off].max():.3g})")
    return flips
