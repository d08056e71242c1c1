"""FusedUpsample2D (nn/qupsample.py): the upsampler's conv reading its input's codes upsampled in place.

Bit-identical to diffusers' interpolate followed by the same triton conv (the quantize commutes with
repeating pixels); on the CPU through Triton's interpreter on a 3×2 crop of the embedded model's input.
"""
from __future__ import annotations

import copy

import pytest
import torch
from diffusers.models.upsampling import Upsample2D

import tcaq_kernels
from tcaq_kernels.nn.qupsample import FusedUpsample2D, fuse_upsample
from tcaq_kernels.ops import triton_ops


@pytest.fixture(scope="module")
def models(ref_unet, ref_state_w8a8):
    return {fuse: tcaq_kernels.convert(ref_unet, ref_state_w8a8, backend="triton", fuse_norm=fuse)
            for fuse in (False, True)}


def test_convert_fuses_every_upsampler(models):
    fused, plain = models[True], models[False]
    names = [n for n, m in plain.named_modules() if isinstance(m, Upsample2D)]
    assert names and all(type(fused.get_submodule(n)) is FusedUpsample2D for n in names)
    assert fused.tcaq_info["fused_upsamplers"] == len(names) and fused.tcaq_info["unfused_upsamplers"] == {}
    assert all(type(plain.get_submodule(n)) is Upsample2D for n in names)
    assert list(fused.state_dict()) == list(plain.state_dict())


def test_fused_upsampler_is_bit_identical(models, rng, monkeypatch):
    name = next(n for n, m in models[False].named_modules() if isinstance(m, Upsample2D))
    plain, fused = models[False].get_submodule(name), models[True].get_submodule(name)
    x = torch.randn(2, plain.channels, 3, 2, generator=rng) * 3
    for model in models.values():
        model.tcaq_groups.update(torch.tensor([900, 100]), 2)
    calls = []
    real = triton_ops.qconv2d
    monkeypatch.setattr(triton_ops, "qconv2d", lambda *a, **k: calls.append(k.get("upsample", 1)) or real(*a, **k))
    with torch.no_grad():
        y_plain, y_fused = plain(x), fused(x)
    assert calls == [1, 2] and y_fused.shape == y_plain.shape == (2, plain.channels, 6, 4)
    assert torch.equal(y_fused, y_plain)
    with torch.no_grad():  # an output size other than 2× runs diffusers' path
        assert fused(x, output_size=(5, 4)).shape[-2:] == (5, 4)


def test_refusals(models):
    block = copy.deepcopy(models[False].get_submodule(
        next(n for n, m in models[False].named_modules() if isinstance(m, Upsample2D))))
    block.conv.input_split = 8
    assert fuse_upsample("u", block) == "conv input has a split or a non-uniform quantizer"
    float_block = Upsample2D(8, use_conv=True)
    assert fuse_upsample("f", float_block) == "conv is not a triton QConv2d" and type(float_block) is Upsample2D
