"""DAQ: the power-law MLE, the likelihood-ratio decision, and its options."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from tcaq_kernels.calib.daq import decide, fit_power_law, loglik_ratio, power_law_alpha


def _pareto(n: int, alpha: float, xmin: float, gen: torch.Generator) -> torch.Tensor:
    """Continuous power law p(x) ∝ x^-alpha on [xmin, ∞) by inverse transform."""
    u = torch.rand(n, generator=gen, dtype=torch.float64)
    return xmin * (1 - u) ** (-1 / (alpha - 1))


def test_mle_recovers_the_exponent(rng):
    x = _pareto(20000, 2.5, 1e-3, rng).numpy()
    assert power_law_alpha(x, 1e-3) == pytest.approx(2.5, abs=0.05)
    fit = fit_power_law(x)
    assert fit.alpha == pytest.approx(2.5, abs=0.1)
    assert fit.xmin == pytest.approx(1e-3, rel=0.5)


@pytest.mark.parametrize("alternative", ["exponential", "lognormal"])
def test_uniform_samples_get_the_uniform_quantizer(rng, alternative):
    values = torch.rand(20000, generator=rng) * 0.02
    d = decide(values, 8, alternative=alternative)
    assert d.kind == "uniform" and d.loglik_ratio < 0


def test_power_law_samples_get_the_log2_quantizer(rng):
    values = _pareto(20000, 2.5, 1e-4, rng).clamp(max=1.0).float()
    d = decide(values, 4)
    assert d.kind == "log2" and d.loglik_ratio > 0 and d.p_value < 0.01


def test_heavy_tailed_softmax_maps_get_log2_and_flat_ones_uniform(rng):
    heavy = torch.softmax(3.0 * torch.randn(64, 256, generator=rng), dim=-1)
    flat = torch.softmax(0.3 * torch.randn(64, 256, generator=rng), dim=-1)
    assert decide(heavy, 4).kind == "log2"
    assert decide(flat, 4).kind == "uniform"


def test_p_value_threshold_keeps_uniform_when_the_evidence_is_weak(rng):
    values = torch.softmax(3.0 * torch.randn(64, 256, generator=rng), dim=-1)
    free = decide(values, 4, alternative="lognormal")
    strict = decide(values, 4, alternative="lognormal", p_threshold=1e-300)
    assert strict.kind == "uniform"
    assert free.loglik_ratio == strict.loglik_ratio  # the threshold changes only the decision


def test_candidate_parameters_come_from_the_mse_search(rng):
    values = torch.softmax(2.0 * torch.randn(32, 128, generator=rng), dim=-1)
    d = decide(values, 8)
    assert 0 < d.log2_scale <= float(values.max()) * 1.0001
    assert d.uniform_zero == -128  # non-negative data: the range starts at 0
    assert d.mse_uniform > 0 and d.mse_log2 > 0


def test_loglik_ratio_favours_the_true_model(rng):
    x = _pareto(5000, 3.0, 0.01, rng).numpy()
    fit = fit_power_law(x)
    r, p = loglik_ratio(x, fit, "exponential")
    assert r > 0 and 0 <= p < 0.05
    e = np.random.default_rng(int(torch.randint(0, 2**31, (), generator=rng))).exponential(0.01, 5000) + 0.01
    r_e, _ = loglik_ratio(e, fit_power_law(e), "exponential")
    assert r_e < 0


def test_too_few_values_are_refused():
    with pytest.raises(ValueError, match="positive values"):
        fit_power_law(np.zeros(100))
    with pytest.raises(ValueError, match="alternative"):
        loglik_ratio(np.ones(100) + np.arange(100), fit_power_law(np.arange(1, 200.0)), "gamma")


def test_rules_combine_the_test_and_the_measured_error(rng):
    heavy = torch.softmax(3.0 * torch.randn(64, 256, generator=rng), dim=-1)
    for bits in (8, 4):
        d = {rule: decide(heavy, bits, rule=rule) for rule in ("llr", "llr+mse", "mse")}
        lower = d["llr"].mse_log2 < d["llr"].mse_uniform
        assert d["llr"].kind == "log2"  # the power law wins the test at every bit width …
        assert d["llr+mse"].kind == ("log2" if lower else "uniform")
        assert d["mse"].kind == ("log2" if lower else "uniform")
    # … but at 8 bits uniform steps are fine enough that log2's √2 rounding costs more
    assert decide(heavy, 8, rule="llr+mse").kind == "uniform"
    # the ablation controls force the kind and still record the evidence
    for forced in ("uniform", "log2"):
        d = decide(heavy, 4, rule=forced)
        assert d.kind == forced and d.loglik_ratio > 0 and d.mse_uniform > 0 and d.mse_log2 > 0
    with pytest.raises(ValueError, match="daq rule"):
        decide(heavy, 8, rule="bayes")
