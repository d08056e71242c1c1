"""Fused GEGLU feed-forward (nn/qfeedforward.py) against diffusers' forward on the same quantized layers.

The fused module writes its output linear's codes with one kernel; diffusers' forward runs torch's gelu and
multiply and lets the linear quantize the product. Same codes, same GEMM: the outputs agree bit for bit. CPU:
Triton's interpreter, in bf16 (the model dtype whose roundings the kernel reproduces; torch's CPU gelu and the
interpreter's erf agree on every bf16 value but subnormals, which quantize to the same code); the GPU check
runs in the SD-1.5 architecture test and the kernel tests (tests/triton/test_geglu.py).
"""
from __future__ import annotations

import copy

import pytest
import torch
from diffusers.models.attention import FeedForward

import tcaq_kernels
from tcaq_kernels.nn.qfeedforward import FusedFeedForward, fuse_feed_forward

from _fused import outputs_with_and_without


def _feed_forwards(model):
    return [n for n, m in model.named_modules() if isinstance(m, FeedForward)]


def test_convert_fuses_every_geglu_feed_forward(tiny_cond_unet, tiny_cond_state):
    model = tcaq_kernels.convert(tiny_cond_unet, tiny_cond_state, backend="triton")
    names = _feed_forwards(model)
    assert len(names) == 4  # one transformer block down, one in the mid block, two up
    assert model.tcaq_info["fused_feed_forwards"] == 4 and model.tcaq_info["unfused_feed_forwards"] == {}
    assert all(type(model.get_submodule(n)) is FusedFeedForward for n in names)
    plain = tcaq_kernels.convert(tiny_cond_unet, tiny_cond_state, backend="triton", fuse_norm=False)
    reference = tcaq_kernels.convert(tiny_cond_unet, tiny_cond_state, backend="reference")
    for other in (plain, reference):
        assert "fused_feed_forwards" not in other.tcaq_info
        assert all(type(other.get_submodule(n)) is FeedForward for n in names)
    assert list(model.state_dict()) == list(plain.state_dict())


def _check_fused_matches_diffusers(unet, state, rng, t, device):
    model = tcaq_kernels.convert(copy.deepcopy(unet).to(device, torch.bfloat16), state, backend="triton")
    model.tcaq_groups.update(torch.tensor(t, device=device), 2)
    for name in _feed_forwards(model):
        ff = model.get_submodule(name)
        dim = ff.net[0].proj.weight_shape[1]
        x = (torch.randn(2, 13, dim, generator=rng) * 2).to(device, torch.bfloat16)
        with torch.no_grad():
            fused, unfused = ff(x), FeedForward.forward(ff, x)
        assert fused.dtype == torch.bfloat16 and fused.shape == (2, 13, ff.net[2].weight_shape[0])
        assert torch.equal(fused, unfused), name
        ff.train()  # training mode: diffusers' forward, the same numbers
        with torch.no_grad():
            assert torch.equal(ff(x), unfused)
        ff.eval()


@pytest.mark.parametrize("t", [[900, 100], [100, 100]])
def test_fused_feed_forward_matches_diffusers_forward(tiny_cond_unet, tiny_cond_state, rng, t):
    _check_fused_matches_diffusers(tiny_cond_unet, tiny_cond_state, rng, t, "cpu")


@pytest.mark.cuda
def test_fused_feed_forward_matches_diffusers_forward_on_the_gpu(tiny_cond_unet, tiny_cond_state, rng):
    """Compiled kernels, libdevice's erf against torch's CUDA gelu; then the whole UNet with and without the
    fusion (the classes swapped back): the same output."""
    _check_fused_matches_diffusers(tiny_cond_unet, tiny_cond_state, rng, [900, 100], "cuda")
    fused, plain = outputs_with_and_without(tiny_cond_unet, tiny_cond_state, rng, FusedFeedForward, FeedForward)
    assert torch.equal(fused, plain)


def test_what_is_not_fused_says_why(tiny_cond_unet, tiny_cond_state):
    assert "not a diffusers FeedForward" in fuse_feed_forward("m", torch.nn.Identity())
    gelu = FeedForward(16, activation_fn="gelu")
    assert fuse_feed_forward("ff", gelu) == "activation is GELU, not GEGLU" and type(gelu) is FeedForward
    geglu = FeedForward(16, activation_fn="geglu")
    assert fuse_feed_forward("ff", geglu) == "output linear is not a triton QLinear"
    model = tcaq_kernels.convert(tiny_cond_unet, tiny_cond_state, backend="triton")
    ff = model.get_submodule(_feed_forwards(model)[0])
    ff.__class__ = FeedForward
    ff.net[2].act.kinds = ("uniform", "log2")
    assert "not uniform in every timestep group" in fuse_feed_forward("ff", ff)
