"""`convert(model, state)`: swap a diffusers UNet's layers for quantized ones, in a drop-in copy."""
from __future__ import annotations

import copy
import os

import torch

from .nn import QAttnProcessor, QConv2d, QLinear, TimestepGroups
from .nn.timestep import set_groups_hook
from .quant.state import CalibState

_WEIGHTED = {"conv2d": QConv2d, "linear": QLinear}


def convert(model: torch.nn.Module, state: CalibState | str | os.PathLike, backend: str = "reference",
            inplace: bool = False, fuse_norm: bool = True):
    """Return `model` with every quantized layer of `state` replaced, ready for a diffusers pipeline.

    The result is the same UNet class (same forward signature, `.config`, `.dtype`, `.device`);
    a forward pre-hook turns the `timestep` argument into the device-side group index that every
    quantized layer reads its parameters with. `state` may be a CalibState or a path to one.

    With backend "triton" and `fuse_norm` (the default; the other backends ignore it), every diffusers
    ResnetBlock2D runs GroupNorm → SiLU → quantize as one kernel feeding its quantized convs, which also
    take the time-embedding and skip adds into their epilogues (nn/qresnet.py); `tcaq_info["fused_norms"]`
    counts the fused halves and `tcaq_info["unfused_norms"]` says why any block half was not fused.
    It is the faster path (embedded model, H200, CUDA graphs, batch 64 / 256: W8A8 2.25 / 5.76 ms a
    step fused against 3.88 / 11.00 unfused, benchmarks/results/latency.md); `fuse_norm=False` keeps
    diffusers' own GroupNorm and SiLU, with the conv quantizing its float input. The same switch lets
    each Upsample2D's conv read the nearest 2× upsampling of its input's codes in place (nn/qupsample.py,
    bit-identical; `tcaq_info["fused_upsamplers"]`, and `["unfused_upsamplers"]` with the reasons), and
    runs the output norm and its SiLU before the float conv_out as one kernel (nn/qnorm_out.py;
    `tcaq_info["norm_out"]` is "fused" or why not), and lets the up blocks hand their ResnetBlocks the skip
    connection apart, read in place instead of concatenated (nn/qupblock.py, bit-identical;
    `tcaq_info["fused_up_blocks"]`, `["unfused_up_blocks"]`), and lets each transformer block's GEGLU
    feed-forward write its output linear's codes in one kernel (nn/qfeedforward.py, the same codes;
    `tcaq_info["fused_feed_forwards"]`, `["unfused_feed_forwards"]`), and lets each Transformer2DModel's
    GroupNorm write its proj_in's codes and its proj_out read the tokens in place with the residual in its
    epilogue (nn/qtransformer.py; `tcaq_info["fused_transformer_halves"]`, `["unfused_transformer_halves"]`), and
    moves each BasicTransformerBlock's three residual adds into the epilogues of the GEMMs before them and lets
    its norm2 / norm3 LayerNorms write their linears' codes (`tcaq_info["fused_transformer_blocks"]`,
    `["unfused_transformer_blocks"]`, `["fused_layer_norms"]`).
    """
    if not isinstance(state, CalibState):
        state = CalibState.load(state)
    state.validate(model)
    out = model if inplace else copy.deepcopy(model)
    device = next(out.parameters()).device
    groups = TimestepGroups(state.group_edges).to(device)
    modules = dict(out.named_modules())
    for name, layer in state.layers.items():
        module = modules[name]
        if layer.kind == "attention":
            module.set_processor(QAttnProcessor(name, layer, groups, backend, device))
        else:
            parent_name, _, child = name.rpartition(".")
            parent = modules[parent_name] if parent_name else out
            setattr(parent, child, _WEIGHTED[layer.kind].from_state(name, module, layer, groups, backend))
    out.add_module("tcaq_groups", groups)
    groups.attach(out)
    out.register_forward_pre_hook(set_groups_hook, with_kwargs=True)
    out.tcaq_info = {"method": state.method, "bits": state.bits, "backend": backend, "groups": state.num_groups}
    if backend == "triton" and fuse_norm:
        from .nn.qnorm_out import fuse_norm_out

        out.tcaq_info.update(_fuse_resnets(out))
        out.tcaq_info.update(_fuse_up_blocks(out))
        out.tcaq_info.update(_fuse_upsamplers(out))
        out.tcaq_info.update(_fuse_feed_forwards(out))
        out.tcaq_info.update(_fuse_transformers(out))
        out.tcaq_info.update(_fuse_basic_blocks(out))
        out.tcaq_info["norm_out"] = fuse_norm_out(out) or "fused"
    return out


def _fuse_halves(model: torch.nn.Module, kind: type, fuse, fused_key: str, unfused_key: str) -> dict:
    """Run `fuse(name, block)` (→ {half: reason} of the halves it left unfused) on every `kind` block of two
    halves; what was fused, and why not."""
    fused, unfused = 0, {}
    for name, block in list(model.named_modules()):
        if type(block) is kind:
            refusals = fuse(name, block)
            fused += 2 - len(refusals)
            unfused.update({f"{name}.{half}": reason for half, reason in refusals.items()})
    return {fused_key: fused, unfused_key: unfused}


def _fuse_resnets(model: torch.nn.Module) -> dict:
    """Fuse the norm halves of every ResnetBlock2D (nn/qresnet.py)."""
    from diffusers.models.resnet import ResnetBlock2D

    from .nn.qresnet import fuse_resnet

    return _fuse_halves(model, ResnetBlock2D, fuse_resnet, "fused_norms", "unfused_norms")


def _fuse_each(model: torch.nn.Module, kinds: tuple, fuse, fused_key: str, unfused_key: str) -> dict:
    """Run `fuse(name, module)` (→ None when fused, else why not) on every module whose type is one of `kinds`;
    how many were fused, and why the others were not."""
    reasons = {name: fuse(name, m) for name, m in list(model.named_modules()) if type(m) in kinds}
    return {fused_key: sum(r is None for r in reasons.values()),
            unfused_key: {name: r for name, r in reasons.items() if r is not None}}


def _fuse_up_blocks(model: torch.nn.Module) -> dict:
    """Let every up block pass its skip connections apart (nn/qupblock.py)."""
    from diffusers.models.unets.unet_2d_blocks import AttnUpBlock2D, CrossAttnUpBlock2D, UpBlock2D

    from .nn.qupblock import fuse_up_block

    return _fuse_each(model, (UpBlock2D, AttnUpBlock2D, CrossAttnUpBlock2D), fuse_up_block, "fused_up_blocks",
                      "unfused_up_blocks")


def _fuse_upsamplers(model: torch.nn.Module) -> dict:
    """Fuse every Upsample2D's interpolate into its conv (nn/qupsample.py)."""
    from diffusers.models.upsampling import Upsample2D

    from .nn.qupsample import fuse_upsample

    return _fuse_each(model, (Upsample2D,), fuse_upsample, "fused_upsamplers", "unfused_upsamplers")


def _fuse_feed_forwards(model: torch.nn.Module) -> dict:
    """Fuse every GEGLU FeedForward's activation into its output linear's quantize (nn/qfeedforward.py)."""
    from diffusers.models.attention import FeedForward

    from .nn.qfeedforward import fuse_feed_forward

    return _fuse_each(model, (FeedForward,), fuse_feed_forward, "fused_feed_forwards", "unfused_feed_forwards")


def _fuse_transformers(model: torch.nn.Module) -> dict:
    """Fuse the projection halves of every Transformer2DModel (nn/qtransformer.py)."""
    from diffusers.models.transformers.transformer_2d import Transformer2DModel

    from .nn.qtransformer import fuse_transformer

    return _fuse_halves(model, Transformer2DModel, fuse_transformer, "fused_transformer_halves",
                        "unfused_transformer_halves")


def _fuse_basic_blocks(model: torch.nn.Module) -> dict:
    """Move every BasicTransformerBlock's residual adds into GEMM epilogues and let its LayerNorms write codes
    (nn/qtransformer.py)."""
    from diffusers.models.attention import BasicTransformerBlock

    from .nn.qtransformer import FusedBasicTransformerBlock, fuse_basic_block

    info = _fuse_each(model, (BasicTransformerBlock,), fuse_basic_block, "fused_transformer_blocks",
                      "unfused_transformer_blocks")
    info["fused_layer_norms"] = sum(sum(m.tcaq_ln) for m in model.modules() if type(m) is FusedBasicTransformerBlock)
    return info
