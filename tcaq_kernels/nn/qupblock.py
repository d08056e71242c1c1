"""UNet up blocks that hand each ResnetBlock its skip connection apart instead of concatenating it.

A diffusers up block (`UpBlock2D`, `AttnUpBlock2D`, `CrossAttnUpBlock2D`) feeds every ResnetBlock
`torch.cat([hidden, skip], 1)`: a full read and write of both tensors (0.49 ms of a 6.1 ms W8A8 step of
the embedded model at batch 256, H200 step profile), whose only readers in a fused block are the fused
GroupNorm + SiLU + quantize kernel of `norm1` and the quantize of a quantized `conv_shortcut` — both of
which read the two tensors in place (`x2=` of `groupnorm_silu_quantize` and `qconv2d`). The codes are the
same as from the concatenation, bit for bit.

`fuse_up_block(name, block)` swaps the block's class for its subclass here (names, state dict and
`isinstance` stay diffusers') when at least one of its ResnetBlocks has a fused first half
(nn/qresnet.py), or returns why not. The forwards keep diffusers' order of operations; with FreeU
enabled, gradient checkpointing under autograd, or diffusers' deprecated extra arguments they run
diffusers' own forward. A ResnetBlock whose first half is not fused gets the concatenation as before.
"""
from __future__ import annotations

from typing import Optional

import torch
from diffusers.models.unets.unet_2d_blocks import AttnUpBlock2D, CrossAttnUpBlock2D, UpBlock2D

from .qresnet import FusedResnetBlock2D


def fuse_up_block(name: str, block: torch.nn.Module) -> Optional[str]:
    """Swap `block`'s class in place; None when done, else why not."""
    fused_class = _FUSED.get(type(block))
    if fused_class is None:
        return f"'{name}' is a {type(block).__name__}, not a diffusers UpBlock2D / AttnUpBlock2D / CrossAttnUpBlock2D"
    if not any(isinstance(r, FusedResnetBlock2D) and r.tcaq_fuse[0] for r in block.resnets):
        return "no ResnetBlock of the block has a fused first half to read the skip connection in place"
    block.__class__ = fused_class
    return None


def _concatenates(block: torch.nn.Module, args: tuple, kwargs: dict) -> bool:
    """Whether diffusers' own forward must run: FreeU, gradient checkpointing under autograd, extra arguments."""
    freeu = all(getattr(block, k, None) for k in ("s1", "s2", "b1", "b2"))
    checkpointing = torch.is_grad_enabled() and block.gradient_checkpointing
    return bool(freeu or checkpointing or args or kwargs.get("scale") is not None)


def _resnet(resnet: torch.nn.Module, hidden: torch.Tensor, skip: torch.Tensor, temb) -> torch.Tensor:
    """`resnet(cat([hidden, skip], 1), temb)`, without the concatenation where the block reads it in place."""
    if isinstance(resnet, FusedResnetBlock2D):
        return resnet(hidden, temb, skip=skip)
    return resnet(torch.cat([hidden, skip], dim=1), temb)


class FusedUpBlock2D(UpBlock2D):
    """diffusers' UpBlock2D, the skip connections read in place (see module doc)."""

    def forward(self, hidden_states, res_hidden_states_tuple, temb=None, upsample_size=None, *args, **kwargs):
        if _concatenates(self, args, kwargs):
            return super().forward(hidden_states, res_hidden_states_tuple, temb, upsample_size, *args, **kwargs)
        for resnet, skip in zip(self.resnets, reversed(res_hidden_states_tuple)):
            hidden_states = _resnet(resnet, hidden_states, skip, temb)
        for upsampler in self.upsamplers or ():
            hidden_states = upsampler(hidden_states, upsample_size)
        return hidden_states


class FusedAttnUpBlock2D(AttnUpBlock2D):
    """diffusers' AttnUpBlock2D, the skip connections read in place (see module doc)."""

    def forward(self, hidden_states, res_hidden_states_tuple, temb=None, upsample_size=None, *args, **kwargs):
        if _concatenates(self, args, kwargs):
            return super().forward(hidden_states, res_hidden_states_tuple, temb, upsample_size, *args, **kwargs)
        for resnet, attn, skip in zip(self.resnets, self.attentions, reversed(res_hidden_states_tuple)):
            hidden_states = attn(_resnet(resnet, hidden_states, skip, temb))
        for upsampler in self.upsamplers or ():
            if self.upsample_type == "resnet":
                hidden_states = upsampler(hidden_states, temb=temb)
            else:
                hidden_states = upsampler(hidden_states)
        return hidden_states


class FusedCrossAttnUpBlock2D(CrossAttnUpBlock2D):
    """diffusers' CrossAttnUpBlock2D, the skip connections read in place (see module doc)."""

    def forward(self, hidden_states, res_hidden_states_tuple, temb=None, encoder_hidden_states=None,
                cross_attention_kwargs=None, upsample_size=None, attention_mask=None, encoder_attention_mask=None):
        if _concatenates(self, (), cross_attention_kwargs or {}):
            return super().forward(hidden_states, res_hidden_states_tuple, temb, encoder_hidden_states,
                                   cross_attention_kwargs, upsample_size, attention_mask, encoder_attention_mask)
        for resnet, attn, skip in zip(self.resnets, self.attentions, reversed(res_hidden_states_tuple)):
            hidden_states = attn(_resnet(resnet, hidden_states, skip, temb),
                                 encoder_hidden_states=encoder_hidden_states,
                                 cross_attention_kwargs=cross_attention_kwargs, attention_mask=attention_mask,
                                 encoder_attention_mask=encoder_attention_mask, return_dict=False)[0]
        for upsampler in self.upsamplers or ():
            hidden_states = upsampler(hidden_states, upsample_size)
        return hidden_states


_FUSED = {UpBlock2D: FusedUpBlock2D, AttnUpBlock2D: FusedAttnUpBlock2D, CrossAttnUpBlock2D: FusedCrossAttnUpBlock2D}
