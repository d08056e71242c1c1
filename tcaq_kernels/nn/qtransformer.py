"""Transformer2DModel with its GroupNorm writing proj_in's codes, and proj_out reading the tokens in place.

A diffusers Transformer2DModel on an image (Stable Diffusion 1.x: `use_linear_projection=False`) runs
`norm` (GroupNorm) → `proj_in` (1×1 conv) → tokens [B, H·W, C] → its blocks → `.contiguous()` NCHW → `proj_out`
(1×1 conv) → + the input. With triton-backend `QConv2d` projections three of those passes only move data:
torch's GroupNorm first copies its channels-last input to NCHW, proj_in then re-reads the normalised tensor to
quantize it, and the `.contiguous()` after the blocks writes the tokens once more for proj_out to read.

`fuse_transformer(name, block)` swaps the block's class for `FusedTransformer2DModel` (a subclass: names, state
dict and `isinstance` stay diffusers'), fusing each half that qualifies, or returns why not:
* input half: the GroupNorm kernel (`groupnorm_silu_quantize`, SiLU off) writes proj_in's NHWC codes straight
  from the block input, proj_in runs on them, and its channels-last output is the tokens as a view. Refused
  where proj_in is not a triton QConv2d with a uniform, one-width quantizer, or the norm is not a GroupNorm
  over its input channels (`qresnet.norm_conv_refusal`). The codes may differ from torch's GroupNorm + the
  conv's quantize by one where the value lies within fp32 rounding of a rounding boundary (the statistics are
  summed in another order), as in the fused ResnetBlocks.
* output half: proj_out quantizes the tokens where they lie (NCHW view of channels-last memory) and adds the
  block input in its epilogue: one rounding of conv + residual where diffusers rounds the conv's output first.
  Refused where proj_out is not a triton QConv2d or has a split input.
Blocks on linear projections (`use_linear_projection`, SD 2.x) or non-image inputs are left as they are; in
training mode the block runs diffusers' code.
"""
from __future__ import annotations

import torch
from diffusers.models.transformers.transformer_2d import Transformer2DModel

from .qlayers import QConv2d
from .qresnet import norm_conv_refusal, norm_silu_conv


def fuse_transformer(name: str, block: torch.nn.Module) -> dict[str, str]:
    """Fuse what qualifies in `block` (in place); returns {half: reason} for each half left unfused."""
    if type(block) is not Transformer2DModel:
        return {"block": f"'{name}' is a {type(block).__name__}, not a diffusers Transformer2DModel"}
    if not block.is_input_continuous or block.use_linear_projection:
        reason = "linear projections (use_linear_projection)" if block.is_input_continuous else "input is not an image"
        return {"proj_in": reason, "proj_out": reason}
    r_in = norm_conv_refusal(block.norm, block.proj_in)
    out = block.proj_out
    r_out = None
    if not isinstance(out, QConv2d) or out.backend != "triton":
        r_out = "proj_out is not a triton QConv2d"
    elif out.input_split is not None:
        r_out = "proj_out has a split input"
    refusals = {half: r for half, r in (("proj_in", r_in), ("proj_out", r_out)) if r is not None}
    if len(refusals) < 2:
        block.__class__ = FusedTransformer2DModel
        block.tcaq_fuse = (r_in is None, r_out is None)
    return refusals


class FusedTransformer2DModel(Transformer2DModel):
    """diffusers' Transformer2DModel with fused input / output halves (see module doc).

    Not constructed directly: `fuse_transformer` swaps an existing block's class and sets `tcaq_fuse`
    = (input half fused, output half fused).
    """

    tcaq_fuse: tuple[bool, bool]

    def _operate_on_continuous_inputs(self, hidden_states: torch.Tensor):
        if self.training or not self.tcaq_fuse[0]:
            return super()._operate_on_continuous_inputs(hidden_states)
        batch, _, height, width = hidden_states.shape
        projected = norm_silu_conv(self.norm, self.proj_in, hidden_states, None, silu=False)  # channels-last
        inner_dim = projected.shape[1]
        return projected.permute(0, 2, 3, 1).reshape(batch, height * width, inner_dim), inner_dim

    def _get_output_for_continuous_inputs(self, hidden_states: torch.Tensor, residual: torch.Tensor, batch_size: int,
                                          height: int, width: int, inner_dim: int) -> torch.Tensor:
        if self.training or not self.tcaq_fuse[1]:
            return super()._get_output_for_continuous_inputs(hidden_states, residual, batch_size, height, width,
                                                             inner_dim)
        tokens = hidden_states.reshape(batch_size, height, width, inner_dim).permute(0, 3, 1, 2)
        return self.proj_out.fused_call(tokens, tokens.dtype, residual=residual)
