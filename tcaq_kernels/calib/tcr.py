"""TCR — timestep-channel joint reparameterisation of quantized layer inputs (METHOD.md, TCR).

`Y = W·X = (W·diag(r))·(diag(r)⁻¹·X)`: channels whose range is large (at the timesteps where it is
large) are divided by r ≥ 1 before the per-tensor activation quantizer, and the weights' input
channels are multiplied by r, so the float product is unchanged and only the rounding moves. The
division happens inside the quantize step (DESIGN.md §3), so no upstream layer changes.

    m[t, c] = max |X_t[:, c, …]|                 per calibration step (or timestep group) t
    s[t]    = min_c m[t, c]                       over the channels that were non-zero at t
    r[t, c] = max(m[t, c] / s[t], 1)
    r[c]    = Σ_t m[t, c]·r[t, c] / Σ_t m[t, c]   (range-weighted mean over t), optionally ≤ clamp
"""
from __future__ import annotations

from typing import Optional

import torch


def channel_absmax(x: torch.Tensor, channel_dim: int) -> torch.Tensor:
    """Per-sample, per-channel max |x|: [B, C] for a batch-first tensor with channels at `channel_dim`."""
    dim = channel_dim % x.dim()
    if dim == 0:
        raise ValueError("channel_absmax: the channel dim cannot be the batch dim")
    moved = x.detach().abs().movedim(dim, 1)
    return moved.reshape(moved.shape[0], moved.shape[1], -1).amax(dim=2)


def accumulate_absmax(m: torch.Tensor, rows: torch.Tensor, sample_absmax: torch.Tensor) -> torch.Tensor:
    """Fold per-sample channel maxima [B, C] into `m` [T, C] at row `rows[b]` (in place, returned)."""
    index = rows.view(-1, 1).expand_as(sample_absmax).to(m.device)
    return m.scatter_reduce_(0, index, sample_absmax.to(m.dtype), reduce="amax")


def tcr_factors(m: torch.Tensor, clamp: Optional[float] = None) -> torch.Tensor:
    """TCR factors r [C] (float32, all ≥ 1) from the range table m [T, C] (rows never seen: all 0).

    A channel that is zero at every step gets r = 1 (there is nothing to balance), and so does a
    step where every channel is zero.
    """
    if m.dim() != 2:
        raise ValueError(f"tcr_factors: m must be [timesteps, channels], got shape {tuple(m.shape)}")
    m = m.double()
    positive = m > 0
    s = torch.where(positive, m, torch.full_like(m, float("inf"))).amin(dim=1, keepdim=True)
    r_t = torch.where(positive, m / s, torch.ones_like(m)).clamp_min(1.0)
    weight = m.sum(dim=0)
    r = torch.where(weight > 0, (m * r_t).sum(dim=0) / weight.clamp_min(torch.finfo(m.dtype).tiny), torch.ones_like(weight))
    if clamp is not None:
        r = r.clamp(max=float(clamp))
    return r.clamp_min(1.0).float()


def with_strength(r: torch.Tensor, strength: float, clamp: Optional[float] = None) -> Optional[torch.Tensor]:
    """`r^strength` (SmoothQuant's migration strength), clamped; None for strength 0 (TCR off)."""
    if strength == 0:
        return None
    out = r.double().pow(strength)
    if clamp is not None:
        out = out.clamp(max=float(clamp))
    return out.clamp_min(1.0).float()


def fold_weight(weight: torch.Tensor, r: Optional[torch.Tensor]) -> torch.Tensor:
    """`W·diag(r)`: the weight's input channels (dim 1) multiplied by r (unchanged when r is None)."""
    if r is None:
        return weight
    return weight * r.to(weight.dtype).view(1, -1, *([1] * (weight.dim() - 2)))


def unfold_input(x: torch.Tensor, r: Optional[torch.Tensor], channel_dim: int) -> torch.Tensor:
    """`diag(r)⁻¹·X` computed as `x·(1/r)` with the reciprocal in x's precision.

    For fp32 activations this is the quantize step's own order (an fp32 reciprocal, then a product).
    """
    if r is None:
        return x
    shape = [1] * x.dim()
    shape[channel_dim] = -1
    return x * (1.0 / r.to(x.dtype)).view(shape)
