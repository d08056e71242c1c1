"""FeedForward with GEGLU → quantize fused into one kernel in front of its quantized output linear.

A diffusers FeedForward with `activation_fn="geglu"` (every BasicTransformerBlock of Stable Diffusion) runs
`net = [GEGLU, Dropout, Linear(, Dropout)]`: GEGLU projects to [..., 2F] and returns a · gelu(gate) of the two
halves, and the linear quantizes that product. When the linear is a triton-backend `QLinear`, only its codes
matter, so `tcaq::triton_geglu_quantize` writes them straight from the projection's output (triton/geglu.py)
and the linear's GEMM reads them: gelu(gate) and the product never reach memory, and the linear's own quantize
pass disappears (three float passes over strided views become one).

`fuse_feed_forward(name, ff)` swaps the module's class for `FusedFeedForward` (a subclass: module names, state
dict and `isinstance` stay diffusers'), or returns why it could not: the first layer is not a GEGLU (GELU,
approximate GELU, SwiGLU… keep diffusers' path), the output linear is not a triton `QLinear`, has a split input,
or a quantizer that is not uniform in every timestep group. In training mode, or with diffusers' deprecated
extra arguments, the module runs diffusers' forward. The codes are the unfused path's (the kernel forms gelu as
torch's CUDA kernel does, with the same erf), so the outputs agree bit for bit on the GPU.
"""
from __future__ import annotations

from typing import Optional

import torch
from diffusers.models.activations import GEGLU
from diffusers.models.attention import FeedForward

from ..ops import triton_ops
from .qlayers import QLinear


def _refusal(name: str, ff: torch.nn.Module) -> Optional[str]:
    """Why `ff` cannot run fused, or None when it can."""
    if not isinstance(ff, FeedForward):
        return f"'{name}' is a {type(ff).__name__}, not a diffusers FeedForward"
    net = list(ff.net)
    if len(net) < 3 or type(net[0]) is not GEGLU:
        return f"activation is {type(net[0]).__name__ if net else 'missing'}, not GEGLU"
    if not isinstance(net[1], torch.nn.Dropout):
        return f"a {type(net[1]).__name__} between GEGLU and the output linear, not Dropout"
    linear = net[2]
    if not isinstance(linear, QLinear) or linear.backend != "triton":
        return "output linear is not a triton QLinear"
    if linear.input_split is not None:
        return "output linear has a split input"
    if any(kind != "uniform" for kind in linear.act.kinds):
        return "output linear's input quantizer is not uniform in every timestep group"
    return None


def fuse_feed_forward(name: str, ff: torch.nn.Module) -> Optional[str]:
    """Fuse `ff` (in place) and return None, or return why it was left as it is."""
    reason = _refusal(name, ff)
    if reason is not None:
        return reason
    ff.__class__ = FusedFeedForward
    return None


class FusedFeedForward(FeedForward):
    """diffusers' FeedForward forward with GEGLU → quantize as one kernel (see module doc).

    Not constructed directly: `fuse_feed_forward` swaps an existing module's class.
    """

    def forward(self, hidden_states: torch.Tensor, *args, residual: Optional[torch.Tensor] = None,
                **kwargs) -> torch.Tensor:
        """diffusers' forward; `residual` (from a fused transformer block, nn/qtransformer.py) is added to the
        result — in the output linear's epilogue when nothing follows that linear but Dropout in eval mode."""
        if self.training or args or kwargs.get("scale") is not None:
            out = super().forward(hidden_states, *args, **kwargs)
            return out if residual is None else out + residual
        return self._after_projection(self.net[0].proj(hidden_states), residual)

    def from_codes(self, codes: torch.Tensor, out_dtype: torch.dtype,
                   residual: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The module on int8 codes of its input written with the projection's quantizer by a fused producer
        (a transformer block's LayerNorm kernel; the projection's `QLinear.takes_codes`), `residual` added as in
        `forward`."""
        return self._after_projection(self.net[0].proj.codes_call(codes, out_dtype), residual)

    def _after_projection(self, projected: torch.Tensor, residual: Optional[torch.Tensor]) -> torch.Tensor:
        """GEGLU → quantize (one kernel), the output linear, what follows it, the residual."""
        linear = self.net[2]
        a = linear.act
        codes = triton_ops.call(triton_ops.geglu_quantize, projected, a.s_inv, a.zero,
                                linear.groups.current(linear.name), a.bits, linear.r_inv)
        tail = list(self.net[3:])
        if all(isinstance(m, torch.nn.Dropout) for m in tail):  # eval mode: identities
            return linear.codes_call(codes, projected.dtype, residual)
        out = linear.codes_call(codes, projected.dtype)
        for module in tail:
            out = module(out)
        return out if residual is None else out + residual
