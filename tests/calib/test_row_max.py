"""`p_row_max` in calibration: the fake-quant attention quantizes e = exp(S − row max) and divides P̂·V by
Σ e (by the quantized mass with `p_row_norm` as well), float is still softmax·V, the observers record e,
and min-max observes e (that the option reaches every attention layer of a calibrated state:
test_presets.py, for both attention flags)."""
from __future__ import annotations

import pytest
import torch

import tcaq_kernels
from tcaq_kernels.calib.fakequant import FakeQuantAttnProcessor, GroupIndex
from tcaq_kernels.quant.primitives import (
    dequantize_log2,
    fake_quant_uniform,
    qparams_from_range,
    quantize_log2,
    row_max_exp,
)

SCALE = 8 ** -0.5  # softmax scale of head_dim 8


class _Recorder:
    """An observer that keeps the last tensor each quantizer saw."""

    def __init__(self):
        self.seen = {}

    def record(self, layer, act, x):
        self.seen[act] = x.detach().clone()


def _qkv_mask(gen):
    q, k, v = (torch.randn(2, 3, 10, 8, generator=gen) * s for s in (3.0, 1.5, 1.0))  # peaked rows
    return q, k, v, 2 * torch.randn(2, 1, 1, 10, generator=gen)


def _float_attention(q, k, v, mask):
    return ((q @ k.transpose(-1, -2)) * SCALE + mask).softmax(-1) @ v


def _quantized_proc(bits: int, p_kind: str, **flags) -> FakeQuantAttnProcessor:
    """One parameter set; q, k, v symmetric covering ±8 σ of `_qkv_mask`'s inputs, p covering e's [0, 1]
    (uniform) or from 1 (log2)."""
    proc = FakeQuantAttnProcessor("attn", bits, 1, 1, GroupIndex([]), **flags)
    for qz, sigma in zip((proc.q, proc.k, proc.v), (3.0, 1.5, 1.0)):
        qz.set_params(0, 8 * sigma / (2 ** (bits - 1) - 1))
    if p_kind == "log2":
        proc.p.set_params(0, 1.0, 0, "log2")
    else:
        scale, zero = qparams_from_range(torch.tensor(0.0), torch.tensor(1.0), bits)
        proc.p.set_params(0, float(scale), int(zero))
    for qz in proc.quantizers().values():
        qz.enabled = True
    return proc


def _manual_e_and_p_hat(proc: FakeQuantAttnProcessor, q, k, v, mask):
    """The formula written out with the primitives: fake-quant q, k, v; e = row_max_exp(S + mask); p̂ = the p
    quantizer's dequantized value of e."""
    qkv = [fake_quant_uniform(x, qz.scale()[0], qz.zero[0], qz.bits)
           for x, qz in ((q, proc.q), (k, proc.k), (v, proc.v))]
    e = row_max_exp(qkv[0] @ qkv[1].transpose(-1, -2) * SCALE + mask)
    s_p, bits = proc.p.scale()[0], proc.p.bits
    if proc.p.kinds[0] == "log2":
        p_hat = dequantize_log2(quantize_log2(e, 1.0 / s_p, bits), s_p, bits)
    else:
        p_hat = fake_quant_uniform(e, s_p, proc.p.zero[0], bits)
    return e, p_hat, qkv[2]


@pytest.mark.parametrize("p_row_norm", [False, True], ids=["rowmax", "rowmax+rownorm"])
def test_float_row_max_attention_is_softmax_attention(rng, p_row_norm):
    """Quantizers disabled: e·V / Σ e (and, with p_row_norm, the same: it divides only a quantized map) is
    softmax·V; the observer records e, whose rows peak at exactly 1."""
    q, k, v, mask = _qkv_mask(rng)
    proc = FakeQuantAttnProcessor("attn", 8, 1, 1, GroupIndex([]), p_row_norm=p_row_norm, p_row_max=True)
    proc.observer = _Recorder()
    out = proc.attention(q, k, v, SCALE, mask)
    torch.testing.assert_close(out, _float_attention(q, k, v, mask))
    e = proc.observer.seen["p"]
    assert torch.equal(e.amax(-1), torch.ones(e.shape[:-1]))
    torch.testing.assert_close(e, row_max_exp((q @ k.transpose(-1, -2)) * SCALE + mask))
    assert e.sum(-1).mean() > 1.1  # not the softmax, whose rows sum to 1


@pytest.mark.parametrize("p_kind", ["uniform", "log2"])
def test_quantized_row_max_attention_is_the_formula(rng, p_kind):
    """Quantizers on: out = p̂(e)·v̂ / Σ e with e = row_max_exp(S); the observer records that e."""
    q, k, v, mask = _qkv_mask(rng)
    proc = _quantized_proc(8, p_kind, p_row_max=True)
    proc.observer = _Recorder()
    out = proc.attention(q, k, v, SCALE, mask)
    e, p_hat, v_hat = _manual_e_and_p_hat(proc, q, k, v, mask)
    torch.testing.assert_close(out, (p_hat @ v_hat) / e.sum(-1, keepdim=True))
    torch.testing.assert_close(proc.observer.seen["p"], e, rtol=0, atol=0)
    assert torch.equal(e.amax(-1), torch.ones(e.shape[:-1]))
    # the division puts the output on softmax·V's scale: quantization error only (measured ≤ 0.06 uniform,
    # ≤ 0.10 log2 over 300 seeds), about 5-10× less than without it (Σ e is well above 1)
    ref = _float_attention(q, k, v, mask)
    err, undivided = ((x - ref).norm() / ref.norm() for x in (out, p_hat @ v_hat))
    assert err < 0.15 and undivided > 3 * err


def test_row_max_with_row_norm_divides_by_the_quantized_mass(rng):
    """With p_row_norm as well, p̂·v̂ is divided by Σ p̂ — not by Σ e, which 4-bit rounding makes differ."""
    q, k, v, mask = _qkv_mask(rng)
    both = _quantized_proc(4, "uniform", p_row_max=True, p_row_norm=True)
    out = both.attention(q, k, v, SCALE, mask)
    e, p_hat, v_hat = _manual_e_and_p_hat(both, q, k, v, mask)
    torch.testing.assert_close(out, (p_hat / p_hat.sum(-1, keepdim=True)) @ v_hat)
    by_e_sum = _quantized_proc(4, "uniform", p_row_max=True).attention(q, k, v, SCALE, mask)
    assert (out - by_e_sum).abs().max() > 1e-3


def test_minmax_row_max_observes_e_and_leaves_the_float_trajectory(tiny_unet, tiny_scheduler):
    """Min-max with p_row_max: every attention "p" range is e's [0, 1] (each row's max is exactly 1), and
    every other range is bit for bit the plain calibration's (the observed float model still runs softmax·V)."""
    common = dict(num_samples=2, num_steps=4, timestep_groups=2, batch_size=2, progress=False)
    plain = tcaq_kernels.calibrate(tiny_unet, "W8A8", method="minmax", scheduler=tiny_scheduler, **common)
    rowmax = tcaq_kernels.calibrate(tiny_unet, "W8A8", method="minmax", scheduler=tiny_scheduler, p_row_max=True,
                                    **common)
    e_scale, e_zero = qparams_from_range(torch.tensor(0.0), torch.tensor(1.0), 8)
    for name, layer in rowmax.layers.items():
        for act, quant in layer.acts.items():
            other = plain.layers[name].acts[act]
            if act == "p":
                assert torch.equal(quant.scale, e_scale.expand(2)) and torch.equal(quant.zero, e_zero.expand(2)), name
                assert (other.scale < quant.scale).all(), name  # the softmax's rows peak below 1
            else:
                assert torch.equal(quant.scale, other.scale) and torch.equal(quant.zero, other.zero), (name, act)
