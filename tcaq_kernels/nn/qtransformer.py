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

`fuse_basic_block(name, block)` does the same for the BasicTransformerBlocks inside (`FusedBasicTransformerBlock`):
each of its three residual adds — self-attention, cross-attention, feed-forward, each `out + hidden_states` in
diffusers — goes into the epilogue of the GEMM that makes `out` (`to_out.0` of a quantized attention through
`block_residual`, the feed-forward's output linear through `FusedFeedForward`'s `residual`): one rounding of
GEMM + residual where diffusers rounds the GEMM's output first, and no add kernel. An attention or feed-forward
left in float keeps its add in torch. Two of its LayerNorms feed one quantized linear each — norm2 the
cross-attention's `to_q`, norm3 the feed-forward's projection — and there the LayerNorm kernel writes that
linear's codes (`tcaq::triton_layernorm_quantize`, triton/layernorm.py; `tcaq_ln` says which): the normalised
tokens never reach memory and the linear's quantize pass goes (statistics summed in another order than torch's:
a code may differ by one near a rounding boundary). norm1 feeds three projections with three quantizers and
stays torch's. Only `norm_type="layer_norm"` blocks without positional embedding or feed-forward chunking are
fused (Stable Diffusion's); in training mode, or with cross_attention_kwargs (GLIGEN, LoRA scale), the block runs
diffusers' forward.
"""
from __future__ import annotations

from typing import Optional

import torch
from diffusers.models.attention import BasicTransformerBlock
from diffusers.models.transformers.transformer_2d import Transformer2DModel

from ..ops import triton_ops
from ..triton.layernorm import ROW_ELEMENTS
from .qattention import ExplicitAttnProcessor, QAttnProcessor
from .qfeedforward import FusedFeedForward
from .qlayers import QConv2d, QLinear
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


def fuse_basic_block(name: str, block: torch.nn.Module) -> Optional[str]:
    """Fuse `block`'s residual adds (in place) and return None, or return why it was left as it is."""
    if type(block) is not BasicTransformerBlock:
        return f"'{name}' is a {type(block).__name__}, not a diffusers BasicTransformerBlock"
    if block.norm_type != "layer_norm":
        return f"norm_type '{block.norm_type}' (only 'layer_norm' blocks are fused)"
    if block.pos_embed is not None or block._chunk_size is not None:
        return "positional embedding or chunked feed-forward"
    block.__class__ = FusedBasicTransformerBlock
    attn2 = block.attn2
    cross = (attn2 is not None and isinstance(attn2.processor, QAttnProcessor)
             and attn2.processor.backend == "triton" and attn2.group_norm is None and attn2.spatial_norm is None
             and _writes_codes_for(block.norm2, attn2.to_q))
    ff = block.ff
    block.tcaq_ln = (cross, isinstance(ff, FusedFeedForward) and _writes_codes_for(block.norm3, ff.net[0].proj))
    return None


def _writes_codes_for(norm: torch.nn.Module, linear: torch.nn.Module) -> bool:
    """Whether the LayerNorm kernel can write `linear`'s input codes from `norm`'s input."""
    return (type(norm) is torch.nn.LayerNorm and len(norm.normalized_shape) == 1
            and (norm.weight is None) == (norm.bias is None) and norm.normalized_shape[0] <= ROW_ELEMENTS
            and isinstance(linear, QLinear) and linear.takes_codes
            and linear.weight_shape[1] == norm.normalized_shape[0])


def _layernorm_codes(norm: torch.nn.LayerNorm, linear: QLinear, x: torch.Tensor) -> torch.Tensor:
    """`linear`'s int8 input codes of `norm(x)`, one kernel."""
    a = linear.act
    return triton_ops.call(triton_ops.layernorm_quantize, x, norm.weight, norm.bias, norm.eps, a.s_inv, a.zero,
                           linear.groups.current(linear.name), a.bits, linear.r_inv)


def _attend(attn, x: torch.Tensor, residual: torch.Tensor, context, mask) -> torch.Tensor:
    """`attn(x, context, mask) + residual`, the add inside the processor where it takes one."""
    if isinstance(attn.processor, ExplicitAttnProcessor):
        return attn(x, encoder_hidden_states=context, attention_mask=mask, block_residual=residual)
    return attn(x, encoder_hidden_states=context, attention_mask=mask) + residual


class FusedBasicTransformerBlock(BasicTransformerBlock):
    """diffusers' BasicTransformerBlock ("layer_norm") with its residual adds in GEMM epilogues (see module doc).

    Not constructed directly: `fuse_basic_block` swaps an existing block's class and sets `tcaq_ln` = (norm2
    writes the cross-attention's query codes, norm3 writes the feed-forward's input codes).
    """

    tcaq_ln: tuple[bool, bool]

    def forward(self, hidden_states: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                encoder_hidden_states: Optional[torch.Tensor] = None,
                encoder_attention_mask: Optional[torch.Tensor] = None, timestep=None, cross_attention_kwargs=None,
                class_labels=None, added_cond_kwargs=None) -> torch.Tensor:
        if self.training or cross_attention_kwargs:
            return super().forward(hidden_states, attention_mask, encoder_hidden_states, encoder_attention_mask,
                                   timestep, cross_attention_kwargs, class_labels, added_cond_kwargs)
        context = encoder_hidden_states if self.only_cross_attention else None
        hidden_states = _attend(self.attn1, self.norm1(hidden_states), hidden_states, context, attention_mask)
        # the flags were set at conversion; a processor or feed-forward swapped since (an A/B) keeps its own path
        if (self.tcaq_ln[0] and encoder_hidden_states is not None and self.attn2 is not None
                and isinstance(self.attn2.processor, QAttnProcessor)):
            codes = _layernorm_codes(self.norm2, self.attn2.to_q, hidden_states)
            hidden_states = self.attn2(hidden_states, encoder_hidden_states=encoder_hidden_states,
                                       attention_mask=encoder_attention_mask, block_residual=hidden_states,
                                       query_codes=codes)
        elif self.attn2 is not None:
            hidden_states = _attend(self.attn2, self.norm2(hidden_states), hidden_states, encoder_hidden_states,
                                    encoder_attention_mask)
        if self.tcaq_ln[1] and isinstance(self.ff, FusedFeedForward):
            codes = _layernorm_codes(self.norm3, self.ff.net[0].proj, hidden_states)
            return self.ff.from_codes(codes, hidden_states.dtype, residual=hidden_states)
        norm_hidden_states = self.norm3(hidden_states)
        if isinstance(self.ff, FusedFeedForward):
            return self.ff(norm_hidden_states, residual=hidden_states)
        return self.ff(norm_hidden_states) + hidden_states
