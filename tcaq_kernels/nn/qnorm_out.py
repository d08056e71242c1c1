"""The UNet's output norm (`conv_norm_out` → `conv_act`) as one GroupNorm + SiLU kernel.

Before the float `conv_out`, diffusers runs torch's GroupNorm (two kernels) and a SiLU (a third) on the
last decoder activation; `tcaq::triton_groupnorm` with `silu=True` reads it where it lies (NCHW or
channels-last) and writes GroupNorm + SiLU in one pass, channels-last (the layout cuDNN's conv takes
without a transpose). Statistics are fp32 like torch's but summed in another order, so the output
agrees with torch's to fp32 rounding, not bit for bit.

`fuse_norm_out(model)` swaps `conv_norm_out`'s class for `GroupNormSiLU` (a GroupNorm subclass: names
and state dict unchanged) and `conv_act` for `Identity`, or returns why it cannot.
"""
from __future__ import annotations

from typing import Optional

import torch

from ..ops import triton_ops


class GroupNormSiLU(torch.nn.GroupNorm):
    """silu(group_norm(x)) of x [B, C, H, W] on the GroupNorm kernels; set by `fuse_norm_out`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training or x.dim() != 4:
            return torch.nn.functional.silu(super().forward(x))
        B, C, H, W = x.shape
        y = triton_ops.call(triton_ops.groupnorm, x.permute(0, 2, 3, 1).reshape(B, H * W, C), self.weight,
                            self.bias, self.num_groups, self.eps, True)
        return y.view(B, H, W, C).permute(0, 3, 1, 2)


def fuse_norm_out(model: torch.nn.Module) -> Optional[str]:
    """Fuse `model.conv_norm_out` and `model.conv_act` in place; None when fused, else why not."""
    norm, act = getattr(model, "conv_norm_out", None), getattr(model, "conv_act", None)
    if type(norm) is not torch.nn.GroupNorm or not isinstance(act, torch.nn.SiLU):
        return "the UNet has no conv_norm_out GroupNorm followed by a SiLU conv_act"
    norm.__class__ = GroupNormSiLU
    model.conv_act = torch.nn.Identity()
    return None
