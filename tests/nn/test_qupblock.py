"""Fused up blocks (nn/qupblock.py): the skip connections read in place instead of concatenated.

The fused block must give diffusers' block (same fused ResnetBlocks, the concatenation made by torch)
bit for bit: the kernels load the same values from two tensors. CPU: Triton's interpreter on crops of the
embedded model's up-block inputs (UpBlock2D, AttnUpBlock2D; unsplit and split-skip states) and of the
8×8 conditional UNet's (UpBlock2D, CrossAttnUpBlock2D).
"""
from __future__ import annotations

import copy
import inspect

import pytest
import torch
from diffusers.models.unets.unet_2d_blocks import AttnUpBlock2D, CrossAttnUpBlock2D, UpBlock2D

import tcaq_kernels
from tcaq_kernels.calib.minmax import state_from_ranges
from tcaq_kernels.calib.observe import RangeObserver
from tcaq_kernels.nn.qupblock import (FusedAttnUpBlock2D, FusedCrossAttnUpBlock2D, FusedUpBlock2D, _concatenates,
                                      fuse_up_block)
from tcaq_kernels.ops import triton_ops
from tcaq_kernels.quant.layers import quantizable_layers

UP_KINDS = (UpBlock2D, AttnUpBlock2D, CrossAttnUpBlock2D)


def _unfused_copy(block: torch.nn.Module) -> torch.nn.Module:
    """The block with diffusers' class back, sharing its submodules (the same fused ResnetBlocks and timestep
    group index): the concatenating forward."""
    plain = copy.copy(block)
    plain.__class__ = next(k for k in UP_KINDS if isinstance(block, k))
    return plain


def _block_inputs(unet, name, x, t, crop, **kwargs):
    """(hidden_states, res_hidden_states_tuple, temb) the block receives in a float forward, cropped to `crop`
    and in the converted model's layouts: channels-last conv outputs, the first skip (conv_in's, kept float)
    NCHW — so the fused kernels read two layouts at once where the concatenation is NCHW."""
    seen = {}

    def keep(module, args, kwargs):
        seen.setdefault("args", inspect.signature(module.forward).bind(*args, **kwargs).arguments)

    hook = unet.get_submodule(name).register_forward_pre_hook(keep, with_kwargs=True)
    with torch.no_grad():
        unet(x, t, **kwargs)
    hook.remove()
    a, (h, w) = seen["args"], crop
    last = torch.channels_last
    res = [r[..., :h, :w].contiguous(memory_format=last) for r in a["res_hidden_states_tuple"]]
    res[0] = res[0].contiguous()
    return a["hidden_states"][..., :h, :w].contiguous(memory_format=last), tuple(res), a["temb"]


def _record_x2(monkeypatch):
    """Which fused ops got a second concatenation part (x2)."""
    calls = []
    for op in ("groupnorm_silu_quantize", "qconv2d"):
        real = getattr(triton_ops, op)
        monkeypatch.setattr(triton_ops, op, lambda *a, _op=op, _real=real, **k:
                            calls.append((_op, k.get("x2") is not None)) or _real(*a, **k))
    return calls


@pytest.fixture(scope="module")
def fused(ref_unet, ref_state_w8a8):
    return tcaq_kernels.convert(ref_unet, ref_state_w8a8, backend="triton")


def test_convert_fuses_every_up_block(fused, ref_unet, ref_state_w8a8):
    names = [n for n, m in ref_unet.named_modules() if isinstance(m, UP_KINDS)]
    assert len(names) == 4
    assert fused.tcaq_info["fused_up_blocks"] == 4 and fused.tcaq_info["unfused_up_blocks"] == {}
    kinds = {type(fused.get_submodule(n)) for n in names}
    assert kinds == {FusedUpBlock2D, FusedAttnUpBlock2D}
    plain = tcaq_kernels.convert(ref_unet, ref_state_w8a8, backend="triton", fuse_norm=False)
    assert list(fused.state_dict()) == list(plain.state_dict())
    assert "fused_up_blocks" not in plain.tcaq_info
    assert all(type(plain.get_submodule(n)) in UP_KINDS for n in names)


def test_fused_up_block_is_bit_identical(fused, ref_unet, rng, monkeypatch):
    name = "up_blocks.2"  # AttnUpBlock2D with an upsampler
    x, t = torch.randn(2, 3, 32, 32, generator=rng), torch.tensor([900, 100])
    hidden, res, temb = _block_inputs(ref_unet, name, x, t, (2, 2))
    fused.tcaq_groups.update(t, 2)
    block = fused.get_submodule(name)
    plain = _unfused_copy(block)
    calls = _record_x2(monkeypatch)
    with torch.no_grad():
        y_fused = block(hidden, res, temb)
        n_fused = len(calls)
        y_plain = plain(hidden, res, temb)
    assert torch.equal(y_fused, y_plain)
    # each ResnetBlock: norm1 and its conv_shortcut read the two parts; nothing does in diffusers' forward
    assert sum(x2 for _, x2 in calls[:n_fused]) == 2 * len(block.resnets)
    assert not any(x2 for _, x2 in calls[n_fused:])


def test_split_skip_state_is_bit_identical(ref_unet, ref_scheduler, rng):
    """The tcaq/qdiffusion layout: the cat boundary is also the quantizer boundary (c2 == x2's start)."""
    state = tcaq_kernels.calibrate(ref_unet, scheduler=ref_scheduler, bits="W8A8", num_samples=2, num_steps=4,
                                   timestep_groups=2, batch_size=2, split_skip=True, progress=False)
    model = tcaq_kernels.convert(ref_unet, state, backend="triton")
    assert model.tcaq_info["fused_up_blocks"] == 4
    name = "up_blocks.3"
    assert all(state.layers[f"{name}.resnets.{i}.{c}"].input_split is not None
               for i in range(3) for c in ("conv1", "conv_shortcut"))
    x, t = torch.randn(2, 3, 32, 32, generator=rng), torch.tensor([900, 100])
    hidden, res, temb = _block_inputs(ref_unet, name, x, t, (1, 2))
    model.tcaq_groups.update(t, 2)
    block = model.get_submodule(name)
    with torch.no_grad():
        assert torch.equal(block(hidden, res, temb), _unfused_copy(block)(hidden, res, temb))


def test_fallbacks(fused, ref_unet, rng):
    name = "up_blocks.3"  # the smallest UpBlock2D (no upsampler)
    x, t = torch.randn(2, 3, 32, 32, generator=rng), torch.tensor([900, 100])
    hidden, res, temb = _block_inputs(ref_unet, name, x, t, (1, 2))
    fused.tcaq_groups.update(t, 2)
    block = copy.deepcopy(fused.get_submodule(name))
    block.resnets[0].conv1.groups.update(t, 2)  # a copy apart from the UNet: its group is set by hand
    block.resnets[0].tcaq_fuse = (False, True)  # a first half left unfused gets the concatenation
    with torch.no_grad():
        assert torch.equal(block(hidden, res, temb), _unfused_copy(block)(hidden, res, temb))
    # diffusers' own forward under FreeU (it rescales the parts before concatenating), gradient
    # checkpointing under autograd, and diffusers' deprecated extra arguments
    assert not _concatenates(block, (), {})
    assert _concatenates(block, (1.0,), {}) and _concatenates(block, (), {"scale": 1.0})
    block.gradient_checkpointing = True
    assert _concatenates(block, (), {})
    with torch.no_grad():
        assert not _concatenates(block, (), {})
    block.gradient_checkpointing = False
    block.s1 = block.s2 = block.b1 = block.b2 = 0.9
    assert _concatenates(block, (), {})
    # refusals name the reason
    assert "not a diffusers UpBlock2D" in fuse_up_block("m", torch.nn.Identity())
    float_block = UpBlock2D(8, 8, 8, 8, num_layers=1, resnet_groups=4)
    assert "no ResnetBlock" in fuse_up_block("u", float_block) and type(float_block) is UpBlock2D


def test_conditional_unet_up_blocks(tiny_cond_unet, rng):
    """The 8×8 conditional UNet's UpBlock2D and CrossAttnUpBlock2D (cross-attention arguments passed through):
    the same output with the skip connections read in place as with diffusers' concatenation."""
    unet = tiny_cond_unet
    layers = {n: k for n, k in quantizable_layers(unet).items() if n not in ("conv_in", "conv_out")}
    observer = RangeObserver(unet, layers, [500.0])
    text = torch.randn(2, 5, 24, generator=rng)
    with observer, torch.no_grad():
        for t in (900, 100):  # one step in each timestep group
            unet(torch.randn(2, 4, 8, 8, generator=rng), t, encoder_hidden_states=text)
    state = state_from_ranges(unet, observer, "W8A8", ["conv_in", "conv_out"], {})
    model = tcaq_kernels.convert(unet, state, backend="triton")
    assert model.tcaq_info["fused_up_blocks"] == 2 and model.tcaq_info["unfused_up_blocks"] == {}
    assert type(model.up_blocks[1]) is FusedCrossAttnUpBlock2D
    x, t = torch.randn(2, 4, 8, 8, generator=rng), torch.tensor([900, 100])
    model.tcaq_groups.update(t, 2)
    for name, extra in (("up_blocks.0", {}), ("up_blocks.1", {"encoder_hidden_states": text})):
        hidden, res, temb = _block_inputs(unet, name, x, t, (2, 2), encoder_hidden_states=text)
        block = model.get_submodule(name)
        with torch.no_grad():
            assert torch.equal(block(hidden, res, temb, **extra), _unfused_copy(block)(hidden, res, temb, **extra))
