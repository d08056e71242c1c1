"""The oracle itself: float64 sums of integer codes equal int64 arithmetic exactly."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tcaq_kernels.ops import reference as ref


def _codes(shape, rng, lo=-128, hi=128):
    return torch.randint(lo, hi, shape, generator=rng, dtype=torch.int64).to(torch.int8)


@pytest.mark.parametrize("m,k,n", [(1, 3, 5), (37, 129, 33), (64, 1152, 17)])
def test_int_linear_exact(m, k, n, rng):
    a, w = _codes((2, m, k), rng), _codes((n, k), rng)
    z = torch.randint(-128, 128, (2, 1, 1), generator=rng, dtype=torch.int32)
    expect = (a.long() - z.long()) @ w.long().t()
    got = ref.int_linear(a, w, z)
    assert got.dtype == torch.int32 and torch.equal(got.long(), expect)


@pytest.mark.parametrize("cin,k,stride,pad", [(3, 3, 1, 1), (17, 3, 2, 1), (8, 1, 1, 0), (5, 3, 2, 0)])
def test_int_conv2d_exact_with_zero_point_padding(cin, k, stride, pad, rng):
    a, w = _codes((2, cin, 9, 7), rng), _codes((6, cin, k, k), rng)
    z = torch.randint(-128, 128, (2, 1, 1, 1), generator=rng, dtype=torch.int32)
    # padding with the value z in the code domain, then Σ w·(a − z), all in int64
    padded = torch.stack([F.pad(a[i].long(), (pad,) * 4, value=int(z[i])) for i in range(2)])
    cols = F.unfold(padded.double(), k, stride=stride).long()  # [B, C·k·k, L]
    raw = torch.einsum("nk,bkl->bnl", w.long().flatten(1), cols)
    expect = raw - z.view(2, 1, 1).long() * w.long().flatten(1).sum(1).view(1, -1, 1)
    got = ref.int_conv2d(a, w, z, (stride, stride), (pad, pad))
    assert torch.equal(got.flatten(2).long(), expect)


def test_int_attention_products_exact(rng):
    q, k, v = _codes((2, 3, 11, 8), rng), _codes((2, 3, 13, 8), rng), _codes((2, 3, 13, 8), rng)
    assert torch.equal(ref.int_attention_scores(q, k).long(), q.long() @ k.long().transpose(-1, -2))
    p = _codes((2, 3, 11, 13), rng)
    z = torch.tensor(-128, dtype=torch.int32)
    assert torch.equal(ref.int_pv_uniform(p, z, v).long(), (p.long() + 128) @ v.long())


def test_pv_log2_exact_powers(rng):
    codes = torch.randint(0, 16, (4, 9), generator=rng).to(torch.uint8)  # 15 is the zero code at 4 bits
    v = _codes((9, 5), rng)
    levels = torch.where(codes == 15, 0.0, 2.0 ** -codes.double())
    assert torch.equal(ref.pv_log2(codes, 4, v), levels @ v.double())


def test_p_row_mass(rng):
    """The masses a row-normalised P divides by: Σ(c − z) exactly, and Σ 2^-c with the zero code as 0."""
    p = _codes((2, 5, 7), rng)
    z = torch.tensor(-100, dtype=torch.int32)
    got = ref.p_row_mass_uniform(p, z)
    assert got.dtype == torch.int64 and got.shape == (2, 5, 1)
    assert torch.equal(got[..., 0], (p.long() + 100).sum(-1))
    codes = torch.randint(0, 16, (3, 40), generator=rng).to(torch.uint8)
    codes[0] = 15  # a row of zero codes has mass 0
    mass = ref.p_row_mass_log2(codes, 4)[..., 0]
    expect = [sum(0.0 if c == 15 else 2.0 ** -c for c in row.tolist()) for row in codes]
    assert mass.tolist() == expect and mass[0] == 0


def test_epilogue_scales_then_bias(rng):
    acc = torch.randint(-10**6, 10**6, (3, 4), generator=rng, dtype=torch.int32)
    s_w, s_a, bias = torch.rand(4, generator=rng), torch.rand((), generator=rng), torch.randn(4, generator=rng)
    got = ref.epilogue(acc, s_w, s_a, bias, channel_dim=-1)
    assert torch.equal(got, acc.float() * (s_w * s_a) + bias)
