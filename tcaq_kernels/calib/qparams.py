"""Initial quantizer parameters: the searches the primitives do not already provide.

Clipping matters most at 4 bits: a per-channel weight scale covering the largest weight wastes most
levels on one outlier, so the weight scale is searched per output channel (as BRECQ/Q-Diffusion do);
activation scales are searched per timestep group on a sample of observed values.
"""
from __future__ import annotations

from typing import Optional

import torch

from ..quant.primitives import (
    candidate_chunks,
    qparams_from_range,
    qparams_mse,
    qparams_symmetric,
    qrange,
    weight_scale_symmetric,
)
from .tcr import fold_weight


def weight_scale_mse(
    w: torch.Tensor, bits: int, r: Optional[torch.Tensor] = None, grid: int = 100, min_ratio: float = 0.2
) -> torch.Tensor:
    """Per-output-channel scale of `w·r` minimising Σ(w·r − ŵ)² over clipping ratios of max|w·r|.

    Nearest rounding is used in the search; AdaRound then chooses the rounding for this scale.
    Ratio 1 is among the candidates, so the result is never worse than the min-max scale.
    """
    wr = fold_weight(w.detach().float(), r).flatten(1)
    qmin, qmax = qrange(bits)
    base = weight_scale_symmetric(wr, bits)
    ratios = torch.linspace(min_ratio, 1.0, grid, device=wr.device)
    errs = []
    for lo, hi in candidate_chunks(grid, wr.numel()):
        s = base[None, :, None] * ratios[lo:hi, None, None]  # [R, N, 1]
        errs.append((torch.clamp(torch.round(wr / s), qmin, qmax) * s - wr).pow(2).sum(dim=2))
    best = torch.cat(errs).argmin(dim=0)  # first minimum per channel
    return base * ratios[best]


def symmetric_scale_mse(x: torch.Tensor, bits: int, grid: int = 80, min_ratio: float = 0.3) -> torch.Tensor:
    """Symmetric scale minimising ‖x − x̂‖² over clipping ratios of max|x| (zero point 0)."""
    x = x.detach().float().flatten()
    qmin, qmax = qrange(bits)
    base, _ = qparams_symmetric(x.abs().max(), bits)
    scales = base * torch.linspace(min_ratio, 1.0, grid).to(x.device)
    errs = []
    for lo, hi in candidate_chunks(grid, x.numel()):
        s = scales[lo:hi, None]
        errs.append((torch.clamp(torch.round(x[None] / s), qmin, qmax) * s - x[None]).pow(2).mean(dim=1))
    return scales[int(torch.cat(errs).argmin())].reshape(())


def uniform_qparams(values: torch.Tensor, lo: float, hi: float, bits: int, rule: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Asymmetric (scale, zero) for one group: the exact observed range, or the MSE search on a sample.

    The sample always contains the exact extremes (the caller appends them), so the MSE search's
    ratio 1 equals the min-max choice.
    """
    if rule == "minmax":
        return qparams_from_range(torch.tensor(lo), torch.tensor(hi), bits)
    return qparams_mse(values, bits)


def symmetric_qparams(values: torch.Tensor, amax: float, bits: int, rule: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric (scale, zero 0) for one group, by range or MSE search."""
    if rule == "minmax":
        return qparams_symmetric(torch.tensor(amax), bits)
    scale = symmetric_scale_mse(values, bits)
    return scale, torch.zeros((), dtype=torch.int32)
