"""Upsample2D with its nearest 2× interpolation read in place by its quantized conv.

A diffusers `Upsample2D` (interpolate, then a 3×3 conv) makes the 4× larger float tensor, copies it
contiguous first at batch ≥ 64, and the conv then quantizes all of it. Quantizing is elementwise, so
it commutes with repeating pixels: `FusedUpsample2D` quantizes the input at its own resolution and the
conv kernel reads code pixel (ih // 2, iw // 2) for input pixel (ih, iw) (`qconv2d(..., upsample=2)`) —
the same codes and the same output bit for bit, a quarter of the quantize work, no upsampled tensor.

`fuse_upsample(name, block)` swaps the class (a subclass: names, state dict and `isinstance` stay
diffusers') or returns why it cannot: the conv is not a triton `QConv2d` with one uniform input quantizer
and stride 1, or the block normalises, uses a transposed conv or does not interpolate. A call with an
`output_size` other than twice the input, or diffusers' deprecated extra arguments, runs diffusers' forward.
"""
from __future__ import annotations

from typing import Optional

import torch
from diffusers.models.upsampling import Upsample2D

from .qlayers import QConv2d


def fuse_upsample(name: str, block: Upsample2D) -> Optional[str]:
    """Fuse `block` in place; None when fused, else why not."""
    if type(block) is not Upsample2D:
        return f"'{name}' is a {type(block).__name__}, not a diffusers Upsample2D"
    if block.norm is not None or block.use_conv_transpose or not block.interpolate or not block.use_conv:
        return "the block normalises, uses a transposed conv, or does not interpolate then convolve"
    conv = block.conv if block.name == "conv" else block.Conv2d_0
    if not isinstance(conv, QConv2d) or conv.backend != "triton":
        return "conv is not a triton QConv2d"
    if conv.input_split is not None or any(kind != "uniform" for kind in conv.act.kinds):
        return "conv input has a split or a non-uniform quantizer"
    if conv.stride != (1, 1):
        return f"conv stride {conv.stride} is not 1"
    block.__class__ = FusedUpsample2D
    return None


class FusedUpsample2D(Upsample2D):
    """diffusers' Upsample2D with interpolate + conv as quantize + one upsampling conv (see module doc).

    Not constructed directly: `fuse_upsample` swaps an existing block's class."""

    def forward(self, hidden_states: torch.Tensor, output_size=None, *args, **kwargs) -> torch.Tensor:
        doubled = output_size is None or tuple(output_size) == tuple(2 * s for s in hidden_states.shape[-2:])
        if args or kwargs.get("scale") is not None or not doubled:
            return super().forward(hidden_states, output_size, *args, **kwargs)
        conv: QConv2d = self.conv if self.name == "conv" else self.Conv2d_0
        return conv.fused_call(hidden_states, hidden_states.dtype, upsample=2)
