"""DAQ — a dynamically adaptive quantizer for post-softmax maps (METHOD.md, DAQ).

Per attention layer and timestep group: fit a continuous power law to the positive values above
x_min by maximum likelihood, fit the alternative distribution on the same tail, and compare them with
the log-likelihood ratio R = Σ ln p_pl(x) − ln p_alt(x) (Clauset, Shalizi & Newman 2009; Vuong's
test for the p-value). R > 0 (and, optionally, p below a threshold) means the map is heavy-tailed,
which a log2 quantizer represents better; otherwise uniform. Each candidate's parameters come from an
MSE search, so the decision only picks the quantizer family.

The fits run in float64 NumPy on a subsample; x_min is the candidate (a quantile of the sample) whose
fitted power law has the smallest Kolmogorov–Smirnov distance to the tail, as in the `powerlaw`
package, but over a fixed grid of quantiles instead of every distinct value.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Optional

import numpy as np
import torch
from scipy import optimize, special

from ..quant.primitives import (
    dequantize_log2,
    dequantize_uniform,
    log2_scale_mse,
    qparams_mse,
    quantize_log2,
    quantize_uniform,
)
from .config import DAQ_ALTERNATIVES, DAQ_RULES

MIN_TAIL = 50  # fewer tail values than this make the fit meaningless


@dataclass
class PowerLawFit:
    alpha: float
    xmin: float
    n_tail: int
    ks: float


@dataclass
class DaqDecision:
    """The choice for one layer and timestep group, with the evidence it was made on."""

    kind: str  # "log2" | "uniform"
    uniform_scale: float
    uniform_zero: int
    log2_scale: float
    mse_uniform: float
    mse_log2: float
    loglik_ratio: float
    p_value: float
    alpha: float
    xmin: float
    n_tail: int

    def as_dict(self) -> dict:
        return asdict(self)


def power_law_alpha(tail: np.ndarray, xmin: float) -> float:
    """MLE exponent of p(x) ∝ x^-α on [xmin, ∞): α = 1 + n / Σ ln(x / xmin)."""
    logs = np.log(tail / xmin).sum()
    return float(1.0 + tail.size / logs) if logs > 0 else float("inf")


def power_law_logpdf(x: np.ndarray, alpha: float, xmin: float) -> np.ndarray:
    return math.log(alpha - 1.0) - math.log(xmin) - alpha * np.log(x / xmin)


def _ks_distance(tail_sorted: np.ndarray, alpha: float, xmin: float) -> float:
    n = tail_sorted.size
    model_cdf = 1.0 - (tail_sorted / xmin) ** (1.0 - alpha)
    upper = np.arange(1, n + 1) / n
    return float(np.maximum(np.abs(upper - model_cdf), np.abs(upper - 1.0 / n - model_cdf)).max())


def fit_power_law(x: np.ndarray, xmin_quantiles: int = 20) -> PowerLawFit:
    """Power-law fit with x_min chosen by the smallest KS distance over quantiles 0 … 0.95 of `x`."""
    x = np.sort(np.asarray(x, dtype=np.float64))
    x = x[x > 0]
    if x.size < MIN_TAIL:
        raise ValueError(f"fit_power_law: {x.size} positive values, need at least {MIN_TAIL}")
    best: Optional[PowerLawFit] = None
    for xmin in np.unique(np.quantile(x, np.linspace(0.0, 0.95, xmin_quantiles))):
        start = int(np.searchsorted(x, xmin, side="left"))
        tail = x[start:]
        if tail.size < MIN_TAIL:
            continue
        alpha = power_law_alpha(tail, float(xmin))
        if not math.isfinite(alpha):
            continue
        ks = _ks_distance(tail, alpha, float(xmin))
        if best is None or ks < best.ks:
            best = PowerLawFit(alpha=alpha, xmin=float(xmin), n_tail=int(tail.size), ks=ks)
    if best is None:
        raise ValueError("fit_power_law: no x_min candidate leaves a tail with a finite fit (constant values?)")
    return best


def exponential_logpdf(tail: np.ndarray, xmin: float) -> np.ndarray:
    """MLE exponential p(x) = λ·e^{-λ(x − xmin)} on [xmin, ∞), λ = 1 / mean(x − xmin)."""
    mean_excess = float((tail - xmin).mean())
    lam = 1.0 / max(mean_excess, np.finfo(np.float64).tiny)
    return math.log(lam) - lam * (tail - xmin)


def lognormal_logpdf(tail: np.ndarray, xmin: float) -> np.ndarray:
    """MLE lognormal truncated to [xmin, ∞) (numerical optimisation of μ and log σ)."""
    logs = np.log(tail)
    log_xmin = math.log(xmin)

    def logpdf(params):
        mu, log_sigma = params
        sigma = math.exp(log_sigma)
        z = (logs - mu) / sigma
        return -logs - log_sigma - 0.5 * math.log(2 * math.pi) - 0.5 * z * z - special.log_ndtr(-(log_xmin - mu) / sigma)

    start = np.array([logs.mean(), math.log(max(logs.std(), 1e-6))])
    res = optimize.minimize(lambda p: -logpdf(p).sum(), start, method="Nelder-Mead", options={"xatol": 1e-6, "fatol": 1e-9, "maxiter": 2000})
    return logpdf(res.x)


_ALTERNATIVES = {"exponential": exponential_logpdf, "lognormal": lognormal_logpdf}


def loglik_ratio(x: np.ndarray, fit: PowerLawFit, alternative: str = "exponential") -> tuple[float, float]:
    """(R, p): R > 0 favours the power law; p is Vuong's two-sided significance of R's sign."""
    if alternative not in _ALTERNATIVES:
        raise ValueError(f"alternative={alternative!r}: expected one of {DAQ_ALTERNATIVES}")
    x = np.asarray(x, dtype=np.float64)
    tail = x[x >= fit.xmin]
    d = power_law_logpdf(tail, fit.alpha, fit.xmin) - _ALTERNATIVES[alternative](tail, fit.xmin)
    r = float(d.sum())
    sigma = float(d.std())
    p = 1.0 if sigma == 0 else float(special.erfc(abs(r) / (sigma * math.sqrt(2 * tail.size))))
    return r, p


def _mse(x: torch.Tensor, xhat: torch.Tensor) -> float:
    return float((x - xhat).pow(2).mean())


def decide(
    values: torch.Tensor,
    bits: int,
    alternative: str = "exponential",
    p_threshold: Optional[float] = None,
    xmin_quantiles: int = 20,
    rule: str = "llr",
) -> DaqDecision:
    """Choose log2 or uniform for a sample of post-softmax values, with both candidates' MSE qparams.

    `rule` (MethodConfig.daq_rule): "llr" — the power-law test alone (the paper); "llr+mse" — the test
    and a lower log2 MSE; "mse" — the lower MSE alone; "uniform" / "log2" — that kind whatever the
    evidence (ablation controls; the test and both candidates are still computed and recorded).
    """
    if rule not in DAQ_RULES:
        raise ValueError(f"daq rule {rule!r}: expected one of {DAQ_RULES}")
    values = values.detach().float().flatten().cpu()
    scale_u, zero_u = qparams_mse(values, bits)
    scale_l = log2_scale_mse(values, bits)
    mse_u = _mse(values, dequantize_uniform(quantize_uniform(values, 1.0 / scale_u, zero_u, bits), scale_u, zero_u))
    mse_l = _mse(values, dequantize_log2(quantize_log2(values, 1.0 / scale_l, bits), scale_l, bits))
    x = values.double().numpy()
    fit = fit_power_law(x, xmin_quantiles)
    r, p = loglik_ratio(x, fit, alternative)
    heavy_tailed = r > 0 and (p_threshold is None or p < p_threshold)
    lower_error = mse_l < mse_u
    log2 = {"llr": heavy_tailed, "llr+mse": heavy_tailed and lower_error, "mse": lower_error,
            "uniform": False, "log2": True}[rule]
    return DaqDecision(
        kind="log2" if log2 else "uniform",
        uniform_scale=float(scale_u), uniform_zero=int(zero_u), log2_scale=float(scale_l),
        mse_uniform=mse_u, mse_log2=mse_l, loglik_ratio=r, p_value=p,
        alpha=fit.alpha, xmin=fit.xmin, n_tail=fit.n_tail,
    )
