"""Fused Transformer2DModel projections and BasicTransformerBlock residual adds (nn/qtransformer.py) against
diffusers' code on the same quantized layers.

Input half: the GroupNorm kernel writes proj_in's codes (statistics summed in another order than torch's: a code
may differ by one near a rounding boundary), so the tokens agree to 1 % (relative) and mostly exactly. Output half:
proj_out on the tokens in place with the residual in its epilogue, against `.contiguous()` + conv + add: fp32
rounding apart; so are the blocks' residual adds in the GEMM epilogues. CPU: Triton's interpreter on the 8×8 conditional UNet; the GPU test runs the whole UNet in bf16.
"""
from __future__ import annotations

import pytest
import torch
from diffusers.models.attention import BasicTransformerBlock
from diffusers.models.attention_processor import AttnProcessor2_0
from diffusers.models.transformers.transformer_2d import Transformer2DModel

import tcaq_kernels
from tcaq_kernels.nn.qtransformer import (FusedBasicTransformerBlock, FusedTransformer2DModel, fuse_basic_block,
                                          fuse_transformer)

from _fused import outputs_with_and_without


def _transformers(model):
    return [n for n, m in model.named_modules() if isinstance(m, Transformer2DModel)]


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def test_convert_fuses_both_halves_of_every_transformer(tiny_cond_unet, tiny_cond_state):
    model = tcaq_kernels.convert(tiny_cond_unet, tiny_cond_state, backend="triton")
    names = _transformers(model)
    assert len(names) == 4  # down, mid, two up
    assert model.tcaq_info["fused_transformer_halves"] == 8 and model.tcaq_info["unfused_transformer_halves"] == {}
    assert all(type(model.get_submodule(n)) is FusedTransformer2DModel for n in names)
    assert all(model.get_submodule(n).tcaq_fuse == (True, True) for n in names)
    plain = tcaq_kernels.convert(tiny_cond_unet, tiny_cond_state, backend="triton", fuse_norm=False)
    assert "fused_transformer_halves" not in plain.tcaq_info
    assert all(type(plain.get_submodule(n)) is Transformer2DModel for n in names)
    assert list(model.state_dict()) == list(plain.state_dict())


@pytest.mark.parametrize("channels_last", [True, False])
def test_each_half_matches_diffusers(tiny_cond_unet, tiny_cond_state, rng, channels_last):
    model = tcaq_kernels.convert(tiny_cond_unet, tiny_cond_state, backend="triton")
    model.tcaq_groups.update(torch.tensor([900, 100]), 2)
    for name in _transformers(model):
        block = model.get_submodule(name)
        C = block.proj_in.weight_shape[1]
        x = torch.randn(2, C, 8, 8, generator=rng) * 3 + 1
        if channels_last:  # how the converted model's convs hand it over
            x = x.to(memory_format=torch.channels_last)
        with torch.no_grad():
            tokens, dim = block._operate_on_continuous_inputs(x)
            ref_tokens, ref_dim = Transformer2DModel._operate_on_continuous_inputs(block, x)
            assert dim == ref_dim and tokens.shape == ref_tokens.shape == (2, 64, dim)
            assert _relative(tokens, ref_tokens) < 1e-2, name
            assert (tokens == ref_tokens).float().mean() > 0.9, name
            out = block._get_output_for_continuous_inputs(ref_tokens, x, 2, 8, 8, dim)
            ref = Transformer2DModel._get_output_for_continuous_inputs(block, ref_tokens, x, 2, 8, 8, dim)
        assert out.shape == ref.shape == x.shape
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())
        block.train()  # training mode: diffusers' code, the same numbers
        with torch.no_grad():
            assert torch.equal(block._operate_on_continuous_inputs(x)[0], ref_tokens)
        block.eval()


def test_what_is_not_fused_says_why(tiny_cond_unet, tiny_cond_state):
    assert "not a diffusers Transformer2DModel" in fuse_transformer("m", torch.nn.Identity())["block"]
    linear = Transformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=16, norm_num_groups=4,
                                use_linear_projection=True)
    assert fuse_transformer("t", linear) == {"proj_in": "linear projections (use_linear_projection)",
                                             "proj_out": "linear projections (use_linear_projection)"}
    floats = Transformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=16, norm_num_groups=4)
    assert fuse_transformer("t", floats) == {"proj_in": "conv is not a triton QConv2d",
                                             "proj_out": "proj_out is not a triton QConv2d"}
    assert type(floats) is Transformer2DModel
    model = tcaq_kernels.convert(tiny_cond_unet, tiny_cond_state, backend="triton", fuse_norm=False)
    block = model.get_submodule(_transformers(model)[0])
    block.proj_out = torch.nn.Conv2d(32, 32, 1)
    assert fuse_transformer("t", block) == {"proj_out": "proj_out is not a triton QConv2d"}
    assert type(block) is FusedTransformer2DModel and block.tcaq_fuse == (True, False)


@pytest.mark.cuda
def test_the_fused_unet_matches_diffusers_on_the_gpu(tiny_cond_unet, tiny_cond_state, rng):
    fused, plain = outputs_with_and_without(tiny_cond_unet, tiny_cond_state, rng, FusedTransformer2DModel,
                                            Transformer2DModel)
    assert _relative(fused, plain) < 2e-2


def _blocks(model):
    return [n for n, m in model.named_modules() if isinstance(m, BasicTransformerBlock)]


def test_every_transformer_block_adds_its_residuals_in_epilogues(tiny_cond_unet, tiny_cond_state, rng):
    """The residual adds in GEMM epilogues (fp32 rounding apart) and norm2 / norm3 writing their linears' codes
    (a code may flip near a rounding boundary): the block's output agrees with diffusers' to 1 % (relative) and
    almost everywhere to fp32 rounding."""
    model = tcaq_kernels.convert(tiny_cond_unet, tiny_cond_state, backend="triton")
    names = _blocks(model)
    assert model.tcaq_info["fused_transformer_blocks"] == len(names) == 4
    assert model.tcaq_info["unfused_transformer_blocks"] == {} and model.tcaq_info["fused_layer_norms"] == 8
    assert all(model.get_submodule(n).tcaq_ln == (True, True) for n in names)
    model.tcaq_groups.update(torch.tensor([900, 100]), 2)
    text = torch.randn(2, 5, 24, generator=rng)
    for i, name in enumerate(names):
        block = model.get_submodule(name)
        assert type(block) is FusedBasicTransformerBlock
        if i == 0:  # a float self-attention: its add stays in torch
            block.attn1.set_processor(AttnProcessor2_0())
        dim = block.norm1.normalized_shape[0]
        x = torch.randn(2, 64, dim, generator=rng) * 2
        with torch.no_grad():
            fused = block(x, encoder_hidden_states=text)
            ref = BasicTransformerBlock.forward(block, x, encoder_hidden_states=text)
        assert fused.shape == ref.shape == x.shape
        assert _relative(fused, ref) < 1e-2, name
        close = (fused - ref).abs() <= 1e-5 * ref.abs() + 1e-5 * ref.abs().max()
        assert close.float().mean() > 0.9, name


def test_what_is_not_fused_in_a_block_says_why():
    assert "not a diffusers BasicTransformerBlock" in fuse_basic_block("m", torch.nn.Identity())
    ada = BasicTransformerBlock(16, 2, 8, norm_type="ada_norm", num_embeds_ada_norm=10)
    assert fuse_basic_block("b", ada) == "norm_type 'ada_norm' (only 'layer_norm' blocks are fused)"
    chunked = BasicTransformerBlock(16, 2, 8)
    chunked.set_chunk_feed_forward(4)
    assert fuse_basic_block("b", chunked) == "positional embedding or chunked feed-forward"
    assert type(ada) is type(chunked) is BasicTransformerBlock


@pytest.mark.cuda
def test_the_fused_blocks_match_diffusers_on_the_gpu(tiny_cond_unet, tiny_cond_state, rng):
    fused, plain = outputs_with_and_without(tiny_cond_unet, tiny_cond_state, rng, FusedBasicTransformerBlock,
                                            BasicTransformerBlock)
    assert _relative(fused, plain) < 1e-2
