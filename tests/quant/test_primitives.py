"""One test group per quantizer primitive: ranges, round trips and edge values."""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tcaq_kernels.quant import primitives as P


@pytest.mark.parametrize("bits", [4, 6, 8])
def test_weight_quant_symmetric_per_channel(bits, rng):
    w = torch.randn(7, 5, 3, 3, generator=rng) * torch.logspace(-3, 1, 7).view(-1, 1, 1, 1)
    w[3] = 0.0  # an all-zero channel must not produce a zero or NaN scale
    scale = P.weight_scale_symmetric(w, bits)
    q = P.quantize_weight(w, scale, bits)
    qmin, qmax = P.qrange(bits)
    assert q.dtype == torch.int8 and q.min() >= qmin and q.max() <= qmax
    assert (scale > 0).all() and torch.isfinite(scale).all()
    assert (q[3] == 0).all()
    # the largest |w| of each non-zero channel hits ±qmax; error ≤ half a step everywhere
    nz = [i for i in range(7) if i != 3]
    assert (q[nz].flatten(1).abs().amax(1) == qmax).all()
    err = (P.dequantize_weight(q, scale) - w).abs().flatten(1).amax(1)
    assert (err <= scale * 0.5 + 1e-7).all()


def test_weight_quant_folds_tcr_factor(rng):
    w = torch.randn(4, 6, generator=rng)
    r = torch.rand(6, generator=rng) * 4 + 1
    scale = P.weight_scale_symmetric(w, 8, r)
    q = P.quantize_weight(w, scale, 8, r)
    torch.testing.assert_close(P.dequantize_weight(q, scale), w * r, atol=scale.max().item() / 2, rtol=0)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(-8, 7), min_size=1, max_size=33), st.integers(1, 3))
def test_int4_pack_roundtrip(values, rows):
    q = torch.tensor(values, dtype=torch.int8).repeat(rows, 1)
    packed = P.pack_int4(q)
    assert packed.dtype == torch.uint8 and packed.shape == (rows, math.ceil(len(values) / 2))
    assert torch.equal(P.unpack_int4(packed, len(values)), q)


def test_int4_pack_layout_low_nibble_first():
    packed = P.pack_int4(torch.tensor([[1, -1, -8, 7, 3]], dtype=torch.int8))
    assert packed.tolist() == [[0xF1, 0x78, 0x03]]


def test_int4_pack_rejects_out_of_range():
    with pytest.raises(ValueError, match="4-bit"):
        P.pack_int4(torch.tensor([8], dtype=torch.int8))


@pytest.mark.parametrize("bits", [4, 6, 8])
def test_uniform_qparams_cover_range_and_zero(bits, rng):
    x = torch.randn(1000, generator=rng) * 3 + 1
    scale, zero = P.qparams_minmax(x, bits)
    q = P.quantize_uniform(x, 1.0 / scale, zero, bits)
    qmin, qmax = P.qrange(bits)
    assert q.min() >= qmin and q.max() <= qmax
    assert (P.dequantize_uniform(q, scale, zero) - x).abs().max() <= scale * 0.5 + 1e-5
    # 0 (conv padding) is exactly representable
    z = P.quantize_uniform(torch.zeros(1), 1.0 / scale, zero, bits)
    assert P.dequantize_uniform(z, scale, zero).item() == 0.0


def test_uniform_positive_only_range_puts_zero_at_qmin():
    scale, zero = P.qparams_from_range(torch.tensor(0.2), torch.tensor(1.0), 8)
    assert zero.item() == -128 and scale.item() == pytest.approx(1.0 / 255)


def test_uniform_degenerate_range_is_safe():
    scale, zero = P.qparams_from_range(torch.tensor(0.0), torch.tensor(0.0), 8)
    assert scale.item() == 1.0 and -128 <= zero.item() <= 127


def test_uniform_rounding_is_half_even_and_clamps():
    x = torch.tensor([0.5, 1.5, 2.5, -0.5, -1.5, 1e9, -1e9])
    q = P.quantize_uniform(x, torch.tensor(1.0), torch.tensor(0, dtype=torch.int32), 8)
    assert q.tolist() == [0, 2, 2, 0, -2, 127, -128]


def test_uniform_tcr_reciprocal_per_channel(rng):
    x = torch.randn(2, 3, 4, 4, generator=rng)
    r_inv = torch.tensor([1.0, 0.5, 0.25])
    s_inv, z = torch.tensor(20.0), torch.tensor(3, dtype=torch.int32)
    q = P.quantize_uniform(x, s_inv, z, 8, r_inv)
    expect = torch.clamp(torch.round((x * r_inv.view(1, 3, 1, 1)) * s_inv) + 3, -128, 127)
    assert torch.equal(q, expect.to(torch.int8))


def test_fake_quant_matches_integer_codes_and_has_gradient(rng):
    x = (torch.randn(64, 9, generator=rng) * 2).requires_grad_()
    scale, zero = P.qparams_minmax(x.detach(), 6)
    r_inv = torch.rand(9, generator=rng) + 0.5
    fq = P.fake_quant_uniform(x, scale, zero, 6, r_inv, channel_dim=-1)
    q = P.quantize_uniform(x.detach(), 1.0 / scale, zero, 6, r_inv, channel_dim=-1)
    assert torch.equal(fq.detach(), P.dequantize_uniform(q, scale, zero))
    fq.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_symmetric_qparams():
    scale, zero = P.qparams_symmetric(torch.tensor(12.7), 8)
    assert zero.item() == 0 and scale.item() == pytest.approx(0.1)


@pytest.mark.parametrize("bits", [4, 6, 8])
def test_log2_codes_match_definition(bits, rng):
    x = torch.rand(5000, generator=rng) ** 4  # softmax-like mass near 0
    s = torch.tensor(0.9)
    codes = P.quantize_log2(x, 1.0 / s, bits)
    naive = torch.clamp(torch.round(-torch.log2(x.double() * (1.0 / s).double())), min=0)
    level_max = P.log2_levels(bits)
    naive = torch.where(naive > level_max, torch.full_like(naive, P.log2_zero_code(bits)), naive)
    assert torch.equal(codes.long(), naive.long())


@pytest.mark.parametrize("bits", [4, 8])
def test_log2_edge_values(bits):
    zero_code = P.log2_zero_code(bits)
    x = torch.tensor([0.0, -1.0, float("nan"), 2.0**-40, 1.0, 4.0, 0.5, 2 ** -0.49, 2 ** -0.51])
    codes = P.quantize_log2(x, torch.tensor(1.0), bits).tolist()
    assert codes[:4] == [zero_code] * 4  # zero, negative, NaN and underflow decode to 0
    assert codes[4:] == [0, 0, 1, 0, 1]  # ≥ s clamps to level 0; rounding in the log domain
    deq = P.dequantize_log2(torch.tensor(codes, dtype=torch.uint8), torch.tensor(2.0), bits)
    assert deq[:4].tolist() == [0.0] * 4 and deq[4:].tolist() == [2.0, 2.0, 1.0, 2.0, 1.0]


def test_log2_levels_are_exact_fp16():
    for bits in (4, 6, 8):
        levels = torch.exp2(-torch.arange(P.log2_levels(bits) + 1, dtype=torch.float64))
        assert torch.equal(levels.half().double(), levels)


def test_percentile_and_mse_qparams_clip_outliers(rng):
    x = torch.randn(20000, generator=rng)
    x[0] = 200.0
    s_mm, _ = P.qparams_minmax(x, 4)
    s_pc, _ = P.qparams_percentile(x, 4, 99.9)
    s_mse, z_mse = P.qparams_mse(x, 4)
    assert s_pc < s_mm and s_mse < s_mm

    def err(s, z):
        return (P.dequantize_uniform(P.quantize_uniform(x, 1 / s, z, 4), s, z) - x).pow(2).mean()

    assert err(s_mse, z_mse) < err(*P.qparams_minmax(x, 4))


def test_log2_scale_mse_beats_max_scale_on_heavy_tail(rng):
    x = torch.softmax(torch.randn(64, 256, generator=rng) * 3, dim=-1)
    s = P.log2_scale_mse(x, 4)
    assert s.ndim == 0 and 0 < s <= x.max()


def test_round_ste_forward_exact_and_identity_gradient(rng):
    x = (torch.randn(100, generator=rng) * 50).requires_grad_()
    y = P.round_ste(x)
    assert torch.equal(y.detach(), torch.round(x.detach()))
    y.sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x))


def test_attention_row_scale_divides_by_positive_mass_only():
    """s_v / mass (one fp32 division) where the quantized row mass is positive, else s_p·s_v."""
    mass = torch.tensor([[37.0], [0.0], [-3.0], [0.4375]])
    s_p, s_v = torch.tensor(0.0123), torch.tensor(0.5)
    got = P.attention_row_scale(mass, s_p, s_v)
    assert got.dtype == torch.float32 and got.shape == mass.shape
    assert got[0, 0] == torch.tensor(0.5) / torch.tensor(37.0)
    assert got[1, 0] == got[2, 0] == s_p * s_v
    assert got[3, 0] == torch.tensor(0.5) / torch.tensor(0.4375)
    assert torch.isfinite(got).all()


def test_row_normalised_output_is_a_convex_combination(rng):
    """A row-normalised P·V of integer codes lies within [min v, max v] per column whatever s_p is:
    the mass a coarse quantizer drops no longer shrinks the output."""
    v = torch.randn(40, 6, generator=rng)
    levels = torch.randint(0, 5, (9, 40), generator=rng).float()
    levels[0] = 0  # a row with no mass keeps the plain factor (and its zero accumulator)
    out = (levels @ v) * P.attention_row_scale(levels.sum(-1, keepdim=True), torch.tensor(1e-3), torch.tensor(1.0))
    assert torch.equal(out[0], torch.zeros(6))
    assert (out[1:] <= v.max(0).values + 1e-5).all() and (out[1:] >= v.min(0).values - 1e-5).all()
