"""TCR math: r ≥ 1, the float product is preserved by folding, the clamp and the degenerate cases."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tcaq_kernels.calib.tcr import accumulate_absmax, channel_absmax, fold_weight, tcr_factors, unfold_input


def test_factors_match_the_formula_on_a_small_table():
    m = torch.tensor([[1.0, 2.0, 8.0], [2.0, 2.0, 2.0]])  # [t, c]
    # s = [1, 2]; r[t,c] = [[1, 2, 8], [1, 1, 1]]; r[c] = Σ m·r / Σ m
    expected = torch.tensor([(1 * 1 + 2 * 1) / 3, (2 * 2 + 2 * 1) / 4, (8 * 8 + 2 * 1) / 10])
    assert torch.allclose(tcr_factors(m), expected)


def test_factors_are_at_least_one_and_rebalance_the_channel_ranges(rng):
    m = (0.5 + torch.rand(12, 40, generator=rng)) * torch.logspace(-2, 2, 40)
    m[:, 0] = 1e-3  # channel 0 is the smallest at every step: it is the reference, r = 1
    r = tcr_factors(m)
    assert r.shape == (40,) and r.dtype == torch.float32
    assert (r >= 1).all() and r[0] == 1.0
    balanced = m.amax(dim=0) / r
    assert balanced.max() / balanced.min() < (m.amax(dim=0).max() / m.amax(dim=0).min()) / 100


def test_clamp_bounds_r_and_keeps_it_at_least_one(rng):
    m = torch.rand(6, 16, generator=rng) * torch.logspace(0, 3, 16)
    r = tcr_factors(m, clamp=4.0)
    assert (r <= 4.0).all() and (r >= 1).all()
    assert torch.allclose(r, tcr_factors(m).clamp(max=4.0))


def test_dead_channels_and_unseen_steps_get_r_one():
    m = torch.tensor([[0.0, 1.0, 3.0], [0.0, 0.0, 0.0], [0.0, 2.0, 2.0]])
    r = tcr_factors(m)
    assert r[0] == 1.0  # never non-zero
    assert torch.isfinite(r).all() and (r >= 1).all()


@pytest.mark.parametrize("kind", ["conv", "linear"])
def test_folding_preserves_the_float_product_before_rounding(rng, kind):
    """(W·diag(r))·(diag(r)⁻¹·X) = W·X: exact up to float64 rounding (no quantization involved)."""
    r = 1 + 9 * torch.rand(24, generator=rng, dtype=torch.float64)
    if kind == "conv":
        w = torch.randn(8, 24, 3, 3, generator=rng, dtype=torch.float64)
        x = torch.randn(2, 24, 7, 5, generator=rng, dtype=torch.float64)
        y, y_folded = F.conv2d(x, w, padding=1), F.conv2d(unfold_input(x, r.double(), 1), fold_weight(w, r), padding=1)
    else:
        w = torch.randn(8, 24, generator=rng, dtype=torch.float64)
        x = torch.randn(3, 5, 24, generator=rng, dtype=torch.float64)
        y, y_folded = F.linear(x, w), F.linear(unfold_input(x, r.double(), -1), fold_weight(w, r))
    assert torch.allclose(y, y_folded, rtol=1e-12, atol=1e-12)
    assert not torch.equal(fold_weight(w, r), w)


def test_range_table_accumulates_per_step_and_channel(rng):
    x = torch.randn(4, 3, 5, 5, generator=rng)
    per_sample = channel_absmax(x, 1)
    assert torch.equal(per_sample, x.abs().amax(dim=(2, 3)))
    m = accumulate_absmax(torch.zeros(2, 3), torch.tensor([0, 1, 1, 0]), per_sample)
    assert torch.equal(m[0], torch.maximum(per_sample[0], per_sample[3]))
    assert torch.equal(m[1], torch.maximum(per_sample[1], per_sample[2]))
    assert torch.equal(channel_absmax(x.permute(0, 2, 3, 1), -1), per_sample)


def test_bad_table_shape_is_refused():
    with pytest.raises(ValueError, match="timesteps, channels"):
        tcr_factors(torch.ones(3))
