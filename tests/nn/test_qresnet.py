"""Fused ResnetBlock2D (nn/qresnet.py) against the unfused triton backend, and convert's fuse_norm.

The fused block's conv codes come from the GroupNorm kernel, the unfused block's from torch's
GroupNorm + SiLU and the conv's quantize: they may differ by one code within the fp32 band of a
rounding boundary (tests/triton/_gn_band.py), nowhere else; with equal codes the block outputs agree
to fp32 rounding. CPU: Triton's interpreter on 5×4 crops of the embedded model's activations; the whole
UNet (fused against unfused, and a short sampling run) on the GPU only: the interpreter takes minutes.
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from diffusers.models.resnet import ResnetBlock2D

import tcaq_kernels
from tcaq_kernels.nn.qresnet import FusedResnetBlock2D, fuse_resnet
from tcaq_kernels.ops import triton_ops

sys.path.insert(0, str(Path(__file__).parents[1] / "triton"))
from _gn_band import assert_codes_within_band, band, reference  # noqa: E402

# a block without and one with conv_shortcut (64 → 128 channels)
BLOCKS = ["down_blocks.0.resnets.0", "down_blocks.1.resnets.0"]


@pytest.fixture(scope="module")
def models(ref_unet, ref_state_w8a8):
    return {fuse: tcaq_kernels.convert(ref_unet, ref_state_w8a8, backend="triton", fuse_norm=fuse)
            for fuse in (False, True)}


def _block_inputs(unet, name, x, t):
    """(input_tensor, temb) the block receives in a float forward."""
    seen = {}

    def keep(module, args):
        seen.setdefault("args", (args[0].detach(), args[1].detach()))

    hook = unet.get_submodule(name).register_forward_pre_hook(keep)
    with torch.no_grad():
        unet(x, t)
    hook.remove()
    return seen["args"]


def _record_input(module, store):
    return module.register_forward_pre_hook(lambda m, a: store.append(a[0].detach()))


def test_convert_fuses_every_resblock(models):
    fused, plain = models[True], models[False]
    blocks = [n for n, m in plain.named_modules() if isinstance(m, ResnetBlock2D)]
    assert blocks and all(type(plain.get_submodule(n)) is ResnetBlock2D for n in blocks)
    assert all(type(fused.get_submodule(n)) is FusedResnetBlock2D for n in blocks)
    # every conv1/conv2 of the embedded model is quantized, unsplit, and no block resamples
    assert fused.tcaq_info["fused_norms"] == 2 * len(blocks) and fused.tcaq_info["unfused_norms"] == {}
    assert "fused_norms" not in plain.tcaq_info
    assert list(fused.state_dict()) == list(plain.state_dict())


def test_fuse_norm_is_convert_default_for_triton_only(ref_unet, ref_state_w8a8):
    default = tcaq_kernels.convert(ref_unet, ref_state_w8a8, backend="triton")
    assert default.tcaq_info["fused_norms"] > 0
    assert any(type(m) is FusedResnetBlock2D for m in default.modules())
    reference = tcaq_kernels.convert(ref_unet, ref_state_w8a8, backend="reference")
    assert "fused_norms" not in reference.tcaq_info
    assert not any(type(m) is FusedResnetBlock2D for m in reference.modules())


@pytest.mark.parametrize("name", BLOCKS)
def test_fused_block_matches_unfused(models, ref_unet, rng, monkeypatch, name):
    x = torch.randn(2, 3, 32, 32, generator=rng)
    t = torch.tensor([900, 100])
    inp, temb = _block_inputs(ref_unet, name, x, t)
    inp = inp[..., :5, :4].contiguous()
    for model in models.values():
        model.tcaq_groups.update(t, 2)
    plain, fused = models[False].get_submodule(name), models[True].get_submodule(name)

    acts, codes = [], []
    hooks = [_record_input(plain.norm1, acts), _record_input(plain.norm2, acts)]
    gn = triton_ops.groupnorm_silu_quantize
    monkeypatch.setattr(triton_ops, "groupnorm_silu_quantize", lambda *a, **k: codes.append(gn(*a, **k)) or codes[-1])
    with torch.no_grad():
        y_plain, y_fused = plain(inp, temb), fused(inp, temb)
    for h in hooks:
        h.remove()

    assert len(codes) == 2 and y_fused.shape == y_plain.shape and y_fused.dtype == y_plain.dtype
    flips = 0
    for (norm, conv), x_norm, c in zip(((plain.norm1, plain.conv1), (plain.norm2, plain.conv2)), acts, codes):
        g = conv.groups.group.long()
        s_inv, zero = conv.act.s_inv[g].view(-1, 1, 1, 1), conv.act.zero[g].view(-1, 1, 1, 1)
        ref, v = reference(x_norm, norm.num_groups, norm.weight, norm.bias, norm.eps, s_inv, zero, conv.act.bits,
                           conv.r_inv)
        tol = band(x_norm, norm.num_groups, norm.weight, norm.bias, norm.eps, s_inv, conv.r_inv)
        flips += int(assert_codes_within_band(c, ref, v, tol, f"{name} {conv.name}").sum())
        if flips:  # conv2's input then differs between the paths; its codes are not comparable
            break
    if flips == 0:
        # equal codes: conv epilogues with temb / shortcut fused vs added in torch, fp32 rounding apart
        torch.testing.assert_close(y_fused, y_plain, rtol=1e-5, atol=1e-5 * y_plain.abs().max().item())
    else:
        rel = ((y_fused - y_plain).norm() / y_plain.norm()).item()
        assert rel < 1e-2, rel


def test_unsupported_halves_fall_back(models, ref_unet, ref_state_w8a8):
    """A conv1 whose split input has two widths keeps half 1 unfused; a resampling block keeps half 1
    unfused; a block whose convs are float is left as diffusers' class."""
    import copy

    model = copy.deepcopy(models[False])
    block = model.get_submodule(BLOCKS[0])
    block.conv1.input_split = 16  # what a split-input QConv2d carries, with a 4-bit second quantizer
    block.conv1.act_skip = copy.deepcopy(block.conv1.act)
    block.conv1.act_skip.bits = 4
    assert fuse_resnet(BLOCKS[0], block) == {"norm1": "conv has a split input of two widths"}
    assert type(block) is FusedResnetBlock2D and block.tcaq_fuse == (False, True)

    down = ResnetBlock2D(in_channels=8, temb_channels=None, groups=4, down=True).eval()
    assert set(fuse_resnet("float", down)) == {"norm1", "norm2"} and type(down) is ResnetBlock2D


def test_split_input_halves_fuse(ref_unet, ref_scheduler, rng, monkeypatch):
    """An up block's ResnetBlock2D reads cat([h, skip]) with two input quantizers (split_skip): its
    half 1 fuses too — the norm kernel writes both ranges' codes (c2) and one conv call keeps a sum per
    range — and its output agrees with the unfused block (the conv_shortcut there is the same split
    conv); codes may flip by one near a rounding boundary, so the agreement is to 1 % (relative)."""
    state = tcaq_kernels.calibrate(ref_unet, scheduler=ref_scheduler, bits="W8A8", num_samples=2, num_steps=4,
                                   timestep_groups=2, batch_size=2, split_skip=True, progress=False)
    name = "up_blocks.1.resnets.0"
    assert state.layers[f"{name}.conv1"].input_split is not None
    models = {f: tcaq_kernels.convert(ref_unet, state, backend="triton", fuse_norm=f) for f in (False, True)}
    assert models[True].tcaq_info["unfused_norms"] == {}
    x, t = torch.randn(2, 3, 32, 32, generator=rng), torch.tensor([900, 100])
    inp, temb = _block_inputs(ref_unet, name, x, t)
    inp = inp[..., :5, :4].contiguous()
    for model in models.values():
        model.tcaq_groups.update(t, 2)
    calls = []
    for op in ("groupnorm_silu_quantize", "qconv2d"):
        real = getattr(triton_ops, op)
        monkeypatch.setattr(triton_ops, op, lambda *a, _op=op, _real=real, **k: calls.append((_op, k.get("c2")))
                            or _real(*a, **k))
    with torch.no_grad():
        y_plain = models[False].get_submodule(name)(inp, temb)
        n_plain = len(calls)
        y_fused = models[True].get_submodule(name)(inp, temb)
    c2 = state.layers[f"{name}.conv1"].input_split
    assert calls[:n_plain] == [("qconv2d", c2), ("qconv2d", None), ("qconv2d", c2)]  # conv1, conv2, shortcut
    assert calls[n_plain:] == [("groupnorm_silu_quantize", c2), ("qconv2d", c2), ("qconv2d", c2),
                               ("groupnorm_silu_quantize", None), ("qconv2d", None)]
    rel = ((y_fused - y_plain).norm() / y_plain.norm()).item()
    assert y_fused.shape == y_plain.shape and rel < 1e-2, rel


@pytest.mark.cuda
def test_fused_unet_on_gpu(ref_unet, ref_scheduler, ref_state_w8a8):
    from tcaq_kernels.sampling import ddim_sample, seeded_noise

    import copy

    unet = copy.deepcopy(ref_unet).cuda()
    models = {f: tcaq_kernels.convert(unet, ref_state_w8a8, backend="triton", fuse_norm=f) for f in (False, True)}
    noise = seeded_noise(range(16), (3, 32, 32), "cuda")
    with torch.no_grad():
        e = {f: m(noise, 500).sample for f, m in models.items()}
    rel = ((e[True] - e[False]).norm() / e[False].norm()).item()
    assert rel < 1e-2, rel
    images = {f: ddim_sample(m, ref_scheduler, noise, 10, progress=False) for f, m in models.items()}
    assert (images[True] - images[False]).pow(2).mean().item() < 1e-4


def test_output_norm_runs_as_one_kernel(models, rng, monkeypatch):
    """convert(fuse_norm=True) runs conv_norm_out + conv_act as `triton_ops.groupnorm(silu=True)`: the same
    output as torch's GroupNorm + SiLU to fp32 rounding, channels-last, and the module names unchanged."""
    from tcaq_kernels.nn.qnorm_out import GroupNormSiLU

    fused, plain = models[True], models[False]
    assert fused.tcaq_info["norm_out"] == "fused" and "norm_out" not in plain.tcaq_info
    assert type(fused.conv_norm_out) is GroupNormSiLU and isinstance(fused.conv_act, torch.nn.Identity)
    x = torch.randn(2, plain.conv_norm_out.num_channels, 5, 4, generator=rng) * 3 + 1
    calls = []
    real = triton_ops.groupnorm
    monkeypatch.setattr(triton_ops, "groupnorm", lambda *a, **k: calls.append(a[-1]) or real(*a, **k))
    with torch.no_grad():
        y = fused.conv_act(fused.conv_norm_out(x))
        ref = plain.conv_act(plain.conv_norm_out(x))
    assert calls == [True] and y.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
