"""`QConv2d` and `QLinear`: integer weights and timestep-indexed activation tables as buffers.

Everything is precomputed at construction (`from_state`): integer weights, Σ_k w for the
zero-point term, reciprocal tables for the quantize step. Forward is one quantize and one integer
product per backend, reading parameters with the device-side group index.
"""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from ..ops import reference as ref
from ..quant.primitives import quantize_uniform, scale_input, ste
from ..quant.state import ActQuant, LayerState, stored_weight_codes
from .timestep import TimestepGroups, per_sample

BACKENDS = ("reference", "simulate", "triton")


class ActTables(torch.nn.Module):
    """One activation quantizer's per-group tables on the device: scale, 1/scale, zero, kind."""

    def __init__(self, act: ActQuant, device=None):
        super().__init__()
        self.bits = act.bits
        self.kinds = tuple(act.kind)
        scale = act.scale.float().to(device)
        self.register_buffer("scale", scale)
        self.register_buffer("s_inv", 1.0 / scale)
        self.register_buffer("zero", act.zero.to(device=device, dtype=torch.int32))
        self.register_buffer("kind_ids", act.kind_ids.to(device))

    def lookup(self, group: torch.Tensor, like: torch.Tensor, layer: str):
        """Per-sample (scale, 1/scale, zero), each shaped [B, 1, …] for `like`."""
        return (
            per_sample(self.scale, group, like, layer),
            per_sample(self.s_inv, group, like, layer),
            per_sample(self.zero, group, like, layer),
        )


class _QWeighted(torch.nn.Module):
    """Shared state of the two weighted layers; subclasses define the integer product."""

    channel_dim: int

    def __init__(self, name: str, layer: LayerState, module: torch.nn.Module, groups: TimestepGroups, backend: str):
        super().__init__()
        if backend not in BACKENDS:
            raise ValueError(f"layer '{name}': unknown backend '{backend}', expected one of {BACKENDS}")
        device, bias = module.weight.device, module.bias
        self.name, self.backend = name, backend
        self.__dict__["groups"] = groups  # shared, owned (and moved) by the UNet; not a submodule here
        self.w_bits, self.weight_shape = layer.w_bits, tuple(layer.weight_shape)
        self.register_buffer("w_scale", layer.weight_scale.float().to(device))
        self.register_buffer("bias", None if bias is None else bias.detach().float().clone())
        r_inv = None if layer.tcr is None else (1.0 / layer.tcr.float()).to(device)
        self.register_buffer("r_inv", r_inv)
        self.act = ActTables(layer.acts["input"], device)
        # One copy of the integer weights, in the layout the backend reads: the kernel's layout
        # (with its weight sums for the zero-point term) for triton, the stored one otherwise.
        if backend == "triton":
            _require_triton(name, device)
            w_op, w_sum = self._prepare_triton(layer.weight_int().to(device), layer.w_bits)
            self.register_buffer("triton_weight", w_op)
            self.register_buffer("triton_wsum", w_sum)
        else:
            self.register_buffer("weight", layer.weight.to(device))  # int8, or packed int4

    @classmethod
    def from_state(cls, name: str, module: torch.nn.Module, layer: LayerState, groups: TimestepGroups, backend: str):
        return cls(name, layer, module, groups, backend)

    def weight_int(self) -> torch.Tensor:
        """int8 weights in the float module's shape (4-bit ones unpacked on the fly)."""
        return stored_weight_codes(self.weight, self.w_bits, self.weight_shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.backend == "triton":
            return self._triton(x).to(x.dtype)
        s, s_inv, z = self.act.lookup(self.groups.group, x, self.name)
        if self.backend == "simulate":
            # Integer-valued fp32 codes with a straight-through gradient, multiplied in fp32: the
            # partial sums stay exact while below 2^24, so this differentiable path reproduces the
            # reference integers and outputs on real activations at float-GEMM speed.
            u = scale_input(x, s_inv, self.r_inv, self.channel_dim)
            codes = ste(quantize_uniform(x, s_inv, z, self.act.bits, self.r_inv, self.channel_dim).float() - z, u - z)
            acc = self._float_product(codes, self.weight_int().float())
        else:
            q = quantize_uniform(x, s_inv, z, self.act.bits, self.r_inv, self.channel_dim)
            acc = self._int_product(q, z)
        return ref.epilogue(acc, self.w_scale, s, self.bias, self.channel_dim).to(x.dtype)

    def extra_repr(self) -> str:
        return f"W{self.w_bits}A{self.act.bits}, shape={self.weight_shape}, groups={len(self.act.kinds)}, backend={self.backend}"


def _require_triton(name: str, device) -> None:
    if torch.device(device).type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(
            f"layer '{name}': backend 'triton' needs the model on a CUDA device "
            "(or TRITON_INTERPRET=1 set before importing triton, to run Triton's CPU interpreter)"
        )


class QLinear(_QWeighted):
    channel_dim = -1

    @staticmethod
    def _prepare_triton(w_int, bits):
        from ..ops.triton_ops import prepare_linear_weight

        return prepare_linear_weight(w_int, bits)

    def _int_product(self, q, z):
        return ref.int_linear(q, self.weight_int(), z)

    def _float_product(self, codes, w):
        return F.linear(codes, w)

    def _triton(self, x):
        from ..ops import triton_ops

        a = self.act
        return triton_ops.qlinear(x, self.triton_weight, self.triton_wsum, self.w_scale, self.bias, a.s_inv, a.scale,
                                  a.zero, self.groups.group, a_bits=a.bits, r_inv=self.r_inv, out_dtype=x.dtype)


class QConv2d(_QWeighted):
    channel_dim = 1

    def __init__(self, name, layer, module: torch.nn.Conv2d, groups, backend):
        if module.groups != 1 or module.padding_mode != "zeros" or isinstance(module.padding, str):
            raise ValueError(
                f"layer '{name}': only groups=1, zero-padded convs with explicit padding can be quantized "
                f"(got groups={module.groups}, padding={module.padding!r}, padding_mode={module.padding_mode!r}); "
                "keep it in float"
            )
        if backend == "triton" and (module.stride[0] != module.stride[1] or tuple(module.dilation) != (1, 1)):
            raise ValueError(f"layer '{name}': the triton conv needs a square stride and dilation 1 "
                             f"(got stride={module.stride}, dilation={module.dilation})")
        super().__init__(name, layer, module, groups, backend)
        self.stride, self.padding, self.dilation = tuple(module.stride), tuple(module.padding), tuple(module.dilation)

    @staticmethod
    def _prepare_triton(w_int, bits):
        from ..ops.triton_ops import prepare_conv_weight

        return prepare_conv_weight(w_int, bits)

    def _int_product(self, q, z):
        return ref.int_conv2d(q, self.weight_int(), z, self.stride, self.padding, self.dilation)

    def _float_product(self, codes, w):
        return F.conv2d(codes, w, None, self.stride, self.padding, self.dilation)

    def _triton(self, x):
        from ..ops import triton_ops

        a = self.act
        return triton_ops.qconv2d(x, self.triton_weight, self.triton_wsum, self.w_scale, self.bias, a.s_inv, a.scale,
                                  a.zero, self.groups.group, self.stride[0], list(self.padding), a_bits=a.bits,
                                  r_inv=self.r_inv, out_dtype=x.dtype)
