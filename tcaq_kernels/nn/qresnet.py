"""ResnetBlock2D with `norm → SiLU → quantize` fused into one kernel in front of each quantized conv.

In a diffusers ResnetBlock2D, `conv1` reads `silu(norm1(x))` and `conv2` reads
`dropout(silu(norm2(h)))`; when the conv is a triton-backend `QConv2d`, only the int8 codes of
that activation matter, so `tcaq::triton_groupnorm_silu_quantize` writes them (NHWC, the conv's
quantizer and timestep group) and the conv reads them directly: the float GroupNorm and SiLU
outputs never reach memory, and the conv's own quantize pass disappears. Two more adds move into
the conv epilogues: the time embedding (`h + temb`, a broadcast residual of conv1) and the skip
connection (the residual of conv2), so each half of the block is two kernels.

`fuse_resnet(name, block)` swaps the block's class for `FusedResnetBlock2D` (a subclass: module
names, state dict and `isinstance` stay diffusers'), fusing each half whose conv qualifies, or
returns why nothing could be fused. Each half falls back to diffusers' own code when:
* its conv is not a triton `QConv2d` (kept float, or another backend), or has a non-uniform quantizer
  kind, or a split input (two quantizers by channel range, quant/state.py) of two widths; a split
  input of one width is fused: the norm kernel writes each range's codes with its own quantizer and
  the conv keeps one int32 sum per range (`QConv2d.split_args`);
* its norm is not a GroupNorm over the conv's input channels, or the activation is not SiLU;
* half 1: the block resamples (`up`/`down`: the resampling sits between SiLU and conv1);
* half 2: `time_embedding_norm` is not "default" (scale_shift modulates between norm2 and SiLU).
In training mode, or with diffusers' deprecated extra arguments, the whole block runs diffusers'
forward. The fused path's codes may differ from the unfused path's by one where the value lies
within fp32 rounding of a rounding boundary (GroupNorm statistics summed in another order).
"""
from __future__ import annotations

from typing import Optional

import torch
from diffusers.models.resnet import ResnetBlock2D

from ..ops import triton_ops
from .qlayers import QConv2d


def norm_conv_refusal(norm: torch.nn.Module, conv: torch.nn.Module) -> Optional[str]:
    """Why `norm(x) → conv` cannot have the norm kernel write the conv's codes, or None when it can."""
    if not isinstance(conv, QConv2d) or conv.backend != "triton":
        return "conv is not a triton QConv2d"
    tables = [conv.act] if conv.input_split is None else [conv.act, conv.act_skip]
    if conv.input_split is not None and conv.act_skip.bits != conv.act.bits:
        return "conv has a split input of two widths"
    if any(kind != "uniform" for t in tables for kind in t.kinds):
        return "conv input quantizer is not uniform in every timestep group"
    if not isinstance(norm, torch.nn.GroupNorm) or norm.num_channels != conv.weight_shape[1]:
        return "norm is not a GroupNorm over the conv's input channels"
    return None


def _half_refusal(norm: torch.nn.Module, conv: torch.nn.Module, act: torch.nn.Module) -> Optional[str]:
    """Why `act(norm(x)) → conv` cannot run fused, or None when it can."""
    reason = norm_conv_refusal(norm, conv)
    if reason is not None:
        return reason
    if not isinstance(act, torch.nn.SiLU):
        return f"activation is {type(act).__name__}, not SiLU"
    return None


def fuse_resnet(name: str, block: ResnetBlock2D) -> dict[str, str]:
    """Fuse what qualifies in `block` (in place); returns {half: reason} for each half left unfused."""
    if type(block) is not ResnetBlock2D:
        return {"block": f"'{name}' is a {type(block).__name__}, not a diffusers ResnetBlock2D"}
    refusals = {}
    r1 = _half_refusal(block.norm1, block.conv1, block.nonlinearity)
    if r1 is None and (block.upsample is not None or block.downsample is not None):
        r1 = "block resamples between SiLU and conv1"
    r2 = _half_refusal(block.norm2, block.conv2, block.nonlinearity)
    if r2 is None and block.time_embedding_norm != "default":
        r2 = f"time_embedding_norm '{block.time_embedding_norm}' modulates between norm2 and SiLU"
    for half, reason in (("norm1", r1), ("norm2", r2)):
        if reason is not None:
            refusals[half] = reason
    if len(refusals) < 2:
        block.__class__ = FusedResnetBlock2D
        block.tcaq_fuse = (r1 is None, r2 is None)
    return refusals


def norm_silu_conv(norm: torch.nn.GroupNorm, conv: QConv2d, x: torch.Tensor, residual: Optional[torch.Tensor],
                   x2: Optional[torch.Tensor] = None, silu: bool = True) -> torch.Tensor:
    """`conv(silu(norm(x))) + residual`: the fused norm/quantize kernel, then the conv on its codes; with `x2`,
    of `cat([x, x2], 1)` read in place; `silu=False`: `conv(norm(x)) + residual`."""
    a, group, split = conv.act, conv.groups.current(conv.name), conv.split_args()
    norm_split = {k: split[k] for k in ("c2", "s_inv2", "zero2") if k in split}
    if x2 is not None:
        norm_split["x2"] = x2
    codes = triton_ops.call(triton_ops.groupnorm_silu_quantize, x, norm.weight, norm.bias, norm.num_groups, norm.eps,
                            a.s_inv, a.zero, group, a.bits, conv.r_inv, **norm_split, silu=silu)
    return conv.fused_call(codes, x.dtype, residual=residual)


def _shortcut(block: ResnetBlock2D, x: torch.Tensor, x2: Optional[torch.Tensor]) -> torch.Tensor:
    """The block's shortcut branch of its input `x` (`cat([x, x2], 1)` when x2 is given)."""
    conv = block.conv_shortcut
    if x2 is None:
        return x if conv is None else conv(x)
    if isinstance(conv, QConv2d):
        return conv.forward_cat(x, x2)
    x = torch.cat([x, x2], dim=1)
    return x if conv is None else conv(x)


def _conv_out_shape(conv: QConv2d, x: torch.Tensor) -> tuple[int, int, int, int]:
    (kh, kw), (sh, sw), (ph, pw) = conv.weight_shape[2:], conv.stride, conv.padding
    return x.shape[0], conv.weight_shape[0], (x.shape[2] + 2 * ph - kh) // sh + 1, (x.shape[3] + 2 * pw - kw) // sw + 1


class FusedResnetBlock2D(ResnetBlock2D):
    """diffusers' ResnetBlock2D forward with fused norm → SiLU → quantize → conv halves (see module doc).

    Not constructed directly: `fuse_resnet` swaps an existing block's class and sets `tcaq_fuse`
    = (half 1 fused, half 2 fused).
    """

    tcaq_fuse: tuple[bool, bool]

    def forward(self, input_tensor: torch.Tensor, temb: torch.Tensor, *args, skip: Optional[torch.Tensor] = None,
                **kwargs) -> torch.Tensor:
        """diffusers' forward; `skip` (from the fused up blocks, nn/qupblock.py) means the input is
        `cat([input_tensor, skip], 1)`, which the fused first half and a quantized shortcut read in place."""
        diffusers_path = self.training or args or kwargs.get("scale") is not None
        if skip is not None and (diffusers_path or not self.tcaq_fuse[0]):
            input_tensor, skip = torch.cat([input_tensor, skip], dim=1), None
        if diffusers_path:
            return super().forward(input_tensor, temb, *args, **kwargs)
        fuse1, fuse2 = self.tcaq_fuse
        if self.time_emb_proj is not None:
            if not self.skip_time_act:
                temb = self.nonlinearity(temb)
            temb = self.time_emb_proj(temb)[:, :, None, None]
        add_temb = temb if self.time_embedding_norm == "default" else None

        if fuse1:
            res = None if add_temb is None else add_temb.expand(_conv_out_shape(self.conv1, input_tensor))
            hidden_states = norm_silu_conv(self.norm1, self.conv1, input_tensor, res, skip)
        else:
            hidden_states, input_tensor = self._first_half(input_tensor)
            if add_temb is not None:
                hidden_states = hidden_states + add_temb

        shortcut = _shortcut(self, input_tensor, skip)
        if fuse2:
            out = norm_silu_conv(self.norm2, self.conv2, hidden_states, shortcut)
        else:
            out = shortcut + self._second_half(hidden_states, temb)
        return out if self.output_scale_factor == 1 else out / self.output_scale_factor

    def _first_half(self, input_tensor):
        """diffusers' norm1 → SiLU → resample → conv1; returns (hidden, the resampled input)."""
        hidden_states = self.nonlinearity(self.norm1(input_tensor))
        if self.upsample is not None:
            if hidden_states.shape[0] >= 64:  # diffusers' workaround for nearest upsampling of large batches
                input_tensor = input_tensor.contiguous()
                hidden_states = hidden_states.contiguous()
            input_tensor = self.upsample(input_tensor)
            hidden_states = self.upsample(hidden_states)
        elif self.downsample is not None:
            input_tensor = self.downsample(input_tensor)
            hidden_states = self.downsample(hidden_states)
        return self.conv1(hidden_states), input_tensor

    def _second_half(self, hidden_states, temb):
        """diffusers' norm2 (with scale_shift) → SiLU → dropout → conv2."""
        hidden_states = self.norm2(hidden_states)
        if self.time_embedding_norm == "scale_shift":
            if temb is None:
                raise ValueError(f"`temb` should not be None when `time_embedding_norm` is {self.time_embedding_norm}")
            time_scale, time_shift = torch.chunk(temb, 2, dim=1)
            hidden_states = hidden_states * (1 + time_scale) + time_shift
        hidden_states = self.dropout(self.nonlinearity(hidden_states))
        return self.conv2(hidden_states)
