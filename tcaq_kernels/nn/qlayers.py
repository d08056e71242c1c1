"""`QConv2d` and `QLinear`: integer weights and timestep-indexed activation tables as buffers.

Everything is precomputed at construction (`from_state`): integer weights, Σ_k w for the
zero-point term, reciprocal tables for the quantize step. Forward is one quantize and one integer
product per backend, reading parameters with the device-side group index.

A layer with a split input (`LayerState.input_split`, quant/state.py) has a second table set,
`act_skip`, for input channels [split, C_in), and runs one quantize and one integer product per
channel range, combined as ops/reference.py states:
`y = (acc1·(s_w·s_a1) + acc2·(s_w·s_a2)) + bias`.

* reference / simulate: each range is quantized with its own tables and multiplied by its weight
  slice; the simulate backend keeps integer-valued fp32 codes × integer weights (exact sums), so
  both backends feed `ref.epilogue` the same accumulators and agree bit for bit.
* triton, `QConv2d`: one `qconv2d` call with the split arguments — the quantize writes both ranges'
  codes with their own tables, and the conv kernel keeps an int32 sum per range (each with its
  weight slice, prepared once here) and combines them in its epilogue in the reference's order.
* triton, `QLinear`: two calls of the unsplit op, one per range, each with no bias and asked for fp32
  `acc_i·(s_w·s_ai)`; the two are added and then the bias, in torch (the reference's order).
  Either way the result is expected to equal the reference exactly whenever the accumulators do
  (tested under the interpreter); the guarantee we state is agreement within fp32 rounding of the
  final combine (a GPU may contract it into an fma).
"""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from ..ops import reference as ref
from ..quant.primitives import quantize_uniform, scale_input, ste
from ..quant.state import SKIP_ACT, ActQuant, LayerState, input_ranges, stored_weight_codes
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
        self.input_split = layer.input_split
        self.act_skip = None if layer.input_split is None else ActTables(layer.acts[SKIP_ACT], device)
        # (first, end) input channel of each range: one range, or two for a split input
        self.channel_ranges = [(lo, hi) for _, lo, hi in input_ranges(layer.input_split, self.weight_shape[1])]
        # One copy of the integer weights, in the layout the backend reads: the kernel's layout
        # (with its weight sums for the zero-point term) for triton, one set per channel range,
        # the stored one otherwise.
        if backend == "triton":
            _require_triton(name, device)
            w_int = layer.weight_int().to(device)
            for suffix, (lo, hi) in zip(("", "_skip"), self.channel_ranges):
                w_op, w_sum = self._prepare_triton(w_int[:, lo:hi].contiguous(), layer.w_bits, module)
                self.register_buffer(f"triton_weight{suffix}", w_op)
                self.register_buffer(f"triton_wsum{suffix}", w_sum)
        else:
            self.register_buffer("weight", layer.weight.to(device))  # int8, or packed int4

    @classmethod
    def from_state(cls, name: str, module: torch.nn.Module, layer: LayerState, groups: TimestepGroups, backend: str):
        return cls(name, layer, module, groups, backend)

    def weight_int(self) -> torch.Tensor:
        """int8 weights in the float module's shape (4-bit ones unpacked on the fly)."""
        return stored_weight_codes(self.weight, self.w_bits, self.weight_shape)

    def range_tables(self) -> list[tuple[ActTables, int, int]]:
        """(tables, first channel, end channel) of each input channel range."""
        return [(t, lo, hi) for t, (lo, hi) in zip((self.act, self.act_skip), self.channel_ranges)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.backend == "triton":
            return self._triton_forward(x).to(x.dtype)
        w_int = self.weight_int()
        parts = [self._accumulate(x, tables, lo, hi, w_int[:, lo:hi]) for tables, lo, hi in self.range_tables()]
        (acc, s), skip = parts[0], (parts[1] if len(parts) > 1 else None)
        return ref.epilogue(acc, self.w_scale, s, self.bias, self.channel_dim, skip).to(x.dtype)

    def _accumulate(self, x: torch.Tensor, tables: ActTables, lo: int, hi: int, w_int: torch.Tensor):
        """(zero-point-corrected accumulator, per-sample s_a) of input channels [lo, hi)."""
        x, r_inv = x.narrow(self.channel_dim, lo, hi - lo), self._r_inv(lo, hi)
        s, s_inv, z = tables.lookup(self.groups.current(self.name), x, self.name)
        if self.backend == "simulate":
            # Integer-valued fp32 codes with a straight-through gradient, multiplied in fp32: the
            # partial sums stay exact while below 2^24, so this differentiable path reproduces the
            # reference integers and outputs on real activations at float-GEMM speed.
            u = scale_input(x, s_inv, r_inv, self.channel_dim)
            codes = ste(quantize_uniform(x, s_inv, z, tables.bits, r_inv, self.channel_dim).float() - z, u - z)
            return self._float_product(codes, w_int.float()), s
        q = quantize_uniform(x, s_inv, z, tables.bits, r_inv, self.channel_dim)
        return self._int_product(q, w_int, z), s

    def _r_inv(self, lo: int, hi: int):
        """TCR reciprocals of input channels [lo, hi) (a contiguous view), or None."""
        return None if self.r_inv is None else self.r_inv[lo:hi]

    def _triton_forward(self, x: torch.Tensor) -> torch.Tensor:
        """One fused kernel call; a split input: one bias-free fp32 call per range, then the sum and the bias."""
        if self.input_split is None:
            return self._triton(x, self.act, self.triton_weight, self.triton_wsum, self.r_inv, self.bias, x.dtype)
        weights = ((self.triton_weight, self.triton_wsum), (self.triton_weight_skip, self.triton_wsum_skip))
        y1, y2 = (self._triton(x.narrow(self.channel_dim, lo, hi - lo), tables, w_op, w_sum, self._r_inv(lo, hi),
                               None, torch.float32)
                  for (tables, lo, hi), (w_op, w_sum) in zip(self.range_tables(), weights))
        y = y1 + y2
        if self.bias is not None:
            shape = [1] * y.dim()
            shape[self.channel_dim] = -1
            y = y + self.bias.view(shape)
        return y

    def extra_repr(self) -> str:
        split = "" if self.input_split is None else f", input_split={self.input_split}"
        return (f"W{self.w_bits}A{self.act.bits}, shape={self.weight_shape}{split}, groups={len(self.act.kinds)}, "
                f"backend={self.backend}")


def _require_triton(name: str, device) -> None:
    if torch.device(device).type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(
            f"layer '{name}': backend 'triton' needs the model on a CUDA device "
            "(or TRITON_INTERPRET=1 set before importing triton, to run Triton's CPU interpreter)"
        )


class QLinear(_QWeighted):
    channel_dim = -1

    @staticmethod
    def _prepare_triton(w_int, bits, module):  # a linear layer's weight sums need nothing of `module`
        from ..ops.triton_ops import prepare_linear_weight

        return prepare_linear_weight(w_int, bits)

    def _int_product(self, q, w_int, z):
        return ref.int_linear(q, w_int, z)

    def _float_product(self, codes, w):
        return F.linear(codes, w)

    @property
    def adds_residual(self) -> bool:
        """Whether `add_into` can run: the triton backend, one input quantizer."""
        return self.backend == "triton" and self.input_split is None

    def add_into(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        """self(x) + residual, the add in the GEMM epilogue (fp32, one rounding to x's dtype)."""
        if not self.adds_residual:
            raise ValueError(f"layer '{self.name}': add_into needs the triton backend and an unsplit input")
        return self._triton(x, self.act, self.triton_weight, self.triton_wsum, self.r_inv, self.bias, x.dtype,
                            residual)

    @property
    def takes_codes(self) -> bool:
        """Whether a fused producer may write this layer's input codes for `codes_call`: `adds_residual`, and a
        uniform input quantizer in every timestep group."""
        return self.adds_residual and all(kind == "uniform" for kind in self.act.kinds)

    def codes_call(self, codes: torch.Tensor, out_dtype: torch.dtype, residual=None) -> torch.Tensor:
        """The layer on int8 codes of its input that a fused producer already wrote with this layer's quantizer
        (TCR factor included: the GEMM reads them as they are), `residual` added in the epilogue; triton backend,
        unsplit input."""
        if not self.adds_residual:
            raise ValueError(f"layer '{self.name}': codes_call needs the triton backend and an unsplit input")
        return self._triton(codes, self.act, self.triton_weight, self.triton_wsum, None, self.bias, out_dtype,
                            residual)

    def _triton(self, x, a, w_op, w_sum, r_inv, bias, out_dtype, residual=None):
        from ..ops import triton_ops

        return triton_ops.call(triton_ops.qlinear, x, w_op, w_sum, self.w_scale, bias, a.s_inv, a.scale, a.zero,
                               self.groups.current(self.name), a_bits=a.bits, r_inv=r_inv, residual=residual,
                               out_dtype=out_dtype)


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
    def _prepare_triton(w_int, bits, module):
        from ..ops.triton_ops import prepare_conv_weight

        return prepare_conv_weight(w_int, bits, module.padding)

    def _int_product(self, q, w_int, z):
        return ref.int_conv2d(q, w_int, z, self.stride, self.padding, self.dilation)

    def _float_product(self, codes, w):
        return F.conv2d(codes, w, None, self.stride, self.padding, self.dilation)

    def _triton_forward(self, x: torch.Tensor) -> torch.Tensor:
        """One kernel call (quantize, then the conv), a split input included: see `split_args`."""
        if self.input_split is not None and self.act_skip.bits != self.act.bits:
            return super()._triton_forward(x)  # two widths: one call per range
        return self.fused_call(x, x.dtype)

    def fused_call(self, x: torch.Tensor, out_dtype: torch.dtype, **kwargs) -> torch.Tensor:
        """The layer's single qconv2d call on `x` (float, or int8 codes from a fused norm), a split input's
        second range included; `kwargs` are further qconv2d options (`x2`, `residual`, `upsample`)."""
        return self._triton(x, self.act, self.triton_weight, self.triton_wsum, self.r_inv, self.bias, out_dtype,
                            **self.split_args(), **kwargs)

    def forward_cat(self, x: torch.Tensor, x2: torch.Tensor) -> torch.Tensor:
        """`self(torch.cat([x, x2], 1))`; the triton kernels read the two parts in place (no concatenated
        copy: a UNet up block's `cat([hidden, skip])` feeding a ResnetBlock's conv_shortcut)."""
        if self.backend != "triton" or (self.input_split is not None and self.act_skip.bits != self.act.bits):
            return self(torch.cat([x, x2], dim=1))
        return self.fused_call(x, x.dtype, x2=x2)

    def split_args(self) -> dict:
        """`qconv2d`'s keyword arguments of the second input range (the skip channels [input_split, C):
        their weights and quantizer tables), {} for an unsplit input."""
        if self.input_split is None:
            return {}
        a = self.act_skip
        return dict(c2=self.input_split, w_q2=self.triton_weight_skip, w_sum2=self.triton_wsum_skip,
                    s_inv2=a.s_inv, scale2=a.scale, zero2=a.zero)

    def _triton(self, x, a, w_op, w_sum, r_inv, bias, out_dtype, **split):
        from ..ops import triton_ops

        return triton_ops.call(triton_ops.qconv2d, x, w_op, w_sum, self.w_scale, bias, a.s_inv, a.scale, a.zero,
                               self.groups.current(self.name), self.stride[0], list(self.padding), a_bits=a.bits,
                               r_inv=r_inv, out_dtype=out_dtype, **split)
