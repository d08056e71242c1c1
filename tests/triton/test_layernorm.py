"""LayerNorm + quantize kernel (triton/layernorm.py) against torch's layer_norm quantized by `quant/primitives.py`.

A LayerNorm over the channels of each token is a GroupNorm with one group of a [tokens, C, 1, 1] tensor, so the
fused GroupNorm's reference and rounding band (`_gn_band.py`, SiLU off) state where a code may differ: by one,
within fp32 rounding of a rounding boundary (the statistics are summed in another order than torch's), nowhere
else. Half-precision inputs add torch's rounding of the LayerNorm output to x's dtype, which the kernel repeats:
there the check is a flip rate and a one-level bound.
"""
import pytest
import torch
import torch.nn.functional as F

from tcaq_kernels.ops.triton_ops import layernorm_quantize
from tcaq_kernels.quant import primitives as P
from tcaq_kernels.triton.layernorm import layernorm_quantize_2d

from _gn_band import MAX_FLIP_RATE, assert_codes_within_band, band, reference
from _tables import Tables


def _inputs(gen, device, B, L, C, dtype=torch.float32):
    x = (torch.randn(B, L, C, generator=gen) * 2 + torch.randn(1, 1, C, generator=gen) * 3).to(dtype)
    w, b = torch.randn(C, generator=gen) * 0.5 + 1, torch.randn(C, generator=gen) * 0.3
    r_inv = torch.rand(C, generator=gen) + 0.5
    t = Tables(gen, groups=3, batch=B, bits=8, device=device)
    return x.to(device), w.to(device), b.to(device), r_inv.to(device), t


def _per_token(t, B, L):
    """The samples' tables repeated per token, shaped [B·L, 1, 1, 1] for the [tokens, C, 1, 1] view."""
    g = t.group.long().repeat_interleave(L)
    return t.s_inv[g].view(-1, 1, 1, 1), t.zero[g].view(-1, 1, 1, 1)


@pytest.mark.parametrize("shape", [(2, 7, 24), (3, 5, 40), (1, 9, 100)])  # odd tokens, padded channel tiles
@pytest.mark.parametrize("affine", [True, False])
def test_codes_within_the_band_of_torchs_layer_norm(gen, device, shape, affine):
    B, L, C = shape
    x, w, b, r_inv, t = _inputs(gen, device, B, L, C)
    w, b = (w, b) if affine else (None, None)
    codes = layernorm_quantize(x, w, b, 1e-5, t.s_inv, t.zero, t.group, 8, r_inv)
    assert codes.dtype == torch.int8 and codes.shape == x.shape
    s_inv, zero = _per_token(t, B, L)
    x4 = x.reshape(-1, C, 1, 1)
    ref, v = reference(x4, 1, w, b, 1e-5, s_inv, zero, 8, r_inv, silu=False)
    tol = band(x4.cpu(), 1, None if w is None else w.cpu(), None if b is None else b.cpu(), 1e-5, s_inv.cpu(),
               r_inv.cpu(), silu=False)
    assert_codes_within_band(codes.reshape(-1, 1, 1, C), ref, v, tol, f"{shape} affine={affine}")


def _half_check(codes, x, w, b, eps, t, r_inv, what):
    """Codes against torch's layer_norm in x's dtype, quantized: at most MAX_FLIP_RATE of them one level apart."""
    B, L, C = x.shape
    y = F.layer_norm(x, (C,), w.to(x.dtype), b.to(x.dtype), eps) if x.is_cuda else \
        F.layer_norm(x.float(), (C,), w, b, eps).to(x.dtype)
    ref = P.quantize_uniform(y.float(), t.per_sample(t.s_inv, 3), t.per_sample(t.zero, 3), 8, r_inv, -1)
    diff = (codes.int() - ref.int()).abs()
    assert int(diff.max()) <= 1, f"{what}: a code {int(diff.max())} levels off"
    assert (diff > 0).float().mean() <= MAX_FLIP_RATE + 2 / diff.numel(), f"{what}: {int((diff > 0).sum())} flips"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_inputs_round_like_torch(gen, device, dtype):
    x, w, b, r_inv, t = _inputs(gen, device, 2, 33, 40, dtype)
    codes = layernorm_quantize(x, w, b, 1e-5, t.s_inv, t.zero, t.group, 8, r_inv)
    _half_check(codes, x, w, b, 1e-5, t, r_inv, str(dtype))


def test_strided_rows_poisoned_output_and_one_group(gen, device):
    x, w, b, r_inv, t = _inputs(gen, device, 2, 6, 24)
    wide = torch.randn(12, 40, generator=gen).to(device)
    wide[:, :24] = x.reshape(12, 24)
    rows = wide[:, :24]  # row stride 40
    ref = layernorm_quantize(x, w, b, 1e-5, t.s_inv, t.zero, t.group, 8, r_inv).reshape(12, 24)
    for poison in (-128, 127):
        out = torch.full((12, 24), poison, dtype=torch.int8, device=device)
        layernorm_quantize_2d(rows, w, b, 1e-5, t.s_inv, t.zero, t.group, 1, 6, 8, r_inv, out)
        assert torch.equal(out, ref)
    one = layernorm_quantize(x, w, b, 1e-5, t.s_inv, t.zero, t.group[:1].reshape(()), 8, r_inv)
    t.group = t.group[:1].expand(2).contiguous()
    assert torch.equal(one, layernorm_quantize(x, w, b, 1e-5, t.s_inv, t.zero, t.group, 8, r_inv))


def test_bad_arguments_are_named(gen, device):
    x, w, b, r_inv, t = _inputs(gen, device, 2, 3, 8)
    with pytest.raises(ValueError, match="weight and bias come together"):
        layernorm_quantize(x, w, None, 1e-5, t.s_inv, t.zero, t.group)
    with pytest.raises(ValueError, match=r"r_inv must have one entry per channel \[8\]"):
        layernorm_quantize(x, w, b, 1e-5, t.s_inv, t.zero, t.group, 8, r_inv[:4])
    with pytest.raises(ValueError, match="do not split into 2 samples"):
        layernorm_quantize(x.reshape(6, 8)[:5], w, b, 1e-5, t.s_inv, t.zero, t.group)
    with pytest.raises(ValueError, match="channels must be contiguous"):
        layernorm_quantize_2d(x.reshape(6, 8).t(), None, None, 1e-5, t.s_inv, t.zero, t.group, 1, 4, 8, None,
                              torch.empty(8, 6, dtype=torch.int8, device=device))


def test_fake_impl_matches(gen, device):
    x, w, b, r_inv, t = _inputs(gen, device, 2, 3, 8)
    torch.library.opcheck(layernorm_quantize, (x, w, b, 1e-5, t.s_inv, t.zero, t.group, 8, r_inv),
                          test_utils=("test_schema", "test_faketensor"))


# SD-1.5's transformer LayerNorms (320 / 640 / 1280 channels) at batch 2 and 8, bf16, on the GPU.
@pytest.mark.cuda
@pytest.mark.parametrize("shape", [(2, 4096, 320), (8, 1024, 640), (8, 256, 1280), (8, 64, 1280)])
def test_sd15_shapes(gen, shape):
    x, w, b, r_inv, t = _inputs(gen, "cuda", *shape, dtype=torch.bfloat16)
    codes = layernorm_quantize(x, w, b, 1e-5, t.s_inv, t.zero, t.group, 8, r_inv)
    _half_check(codes, x, w, b, 1e-5, t, r_inv, str(shape))
