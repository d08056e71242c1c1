"""Quantized attention processor: integer QKᵀ and P·V with the layer's DAQ choice per group.

It replaces a diffusers `Attention` block's processor; the projections (`to_q`, `to_k`, `to_v`,
`to_out.0`) are already `QLinear`s after `convert`. q, k, v are quantized symmetrically; the
post-softmax map P with the quantizer kind (uniform or log2) its timestep group selects. With the
layer's `p_row_norm`, each row of P·V is divided by the row's quantized P mass (quant/primitives.py
`attention_row_scale`) instead of being scaled by s_p. With `p_row_max` (CalibState v4) the map
quantized is exp(S − row max) (`row_max_exp`) and each row is divided by Σ_j y_j, y = that map·s_inv.
"""
from __future__ import annotations

import torch

from ..ops import reference as ref
from ..quant.primitives import (
    attention_row_scale,
    dequantize_log2,
    quantize_log2,
    quantize_uniform,
    row_max_exp,
    ste,
)
from ..quant.state import ACT_KINDS, LayerState
from .qlayers import BACKENDS, ActTables, QLinear
from .timestep import TimestepGroups, per_sample

_LOG2 = ACT_KINDS.index("log2")


class ExplicitAttnProcessor(torch.nn.Module):
    """diffusers' `AttnProcessor2_0` steps with the core product exposed as `attention(q, k, v, …)`.

    Subclasses replace only the core; calibration observes it, `QAttnProcessor` quantizes it.
    """

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *args,
                 block_residual=None, query_codes=None, **kwargs):
        """diffusers' steps. From a fused transformer block (nn/qtransformer.py): `block_residual` is added to the
        result — the block's own `attn_output + hidden_states`, which the triton backend does in to_out's GEMM —
        and `query_codes`, `to_q`'s int8 input codes already written by the block's LayerNorm kernel, replace
        `to_q(hidden_states)` (hidden_states then only gives the shapes)."""
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        hidden_states_shape = hidden_states.shape
        if input_ndim == 4:
            batch, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch, channel, height * width).transpose(1, 2)
        batch, seq_len, _ = hidden_states.shape if encoder_hidden_states is None else encoder_hidden_states.shape
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, seq_len, batch)
            attention_mask = attention_mask.view(batch, attn.heads, -1, attention_mask.shape[-1])
        hidden_states = self.normalize(attn, hidden_states)
        if query_codes is None:
            query = attn.to_q(hidden_states)
        else:
            query = attn.to_q.codes_call(query_codes, hidden_states.dtype)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)
        head_dim = key.shape[-1] // attn.heads
        query, key, value = (t.view(batch, -1, attn.heads, head_dim).transpose(1, 2) for t in (query, key, value))
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        out = self.attention(query, key, value, attn.scale, attention_mask).to(query.dtype)

        out = out.transpose(1, 2).reshape(batch, -1, attn.heads * head_dim)
        return self.project_out(attn, out, residual, hidden_states_shape if input_ndim == 4 else None, block_residual)

    def normalize(self, attn, hidden_states: torch.Tensor) -> torch.Tensor:
        """The block's `group_norm` over the channels of its tokens [B, L, C] (none: unchanged)."""
        if attn.group_norm is None:
            return hidden_states
        return attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

    def project_out(self, attn, out: torch.Tensor, residual: torch.Tensor, spatial,
                    block_residual=None) -> torch.Tensor:
        """`to_out` on the heads' output [B, L, C], back to the block input's layout (`spatial` = its
        [B, C, H, W] shape, or None for [B, L, C] input), the residual added, the rescale applied, then
        `block_residual` added (None: nothing)."""
        out = attn.to_out[1](attn.to_out[0](out))
        if spatial is not None:
            out = out.transpose(-1, -2).reshape(*spatial)
        if attn.residual_connection:
            out = out + residual
        out = out / attn.rescale_output_factor
        return out if block_residual is None else out + block_residual

    def attention(self, q, k, v, softmax_scale: float, mask=None) -> torch.Tensor:
        raise NotImplementedError


class QAttnProcessor(ExplicitAttnProcessor):
    """Drop-in for diffusers' `AttnProcessor2_0` with quantized QKᵀ and P·V."""

    def __init__(self, name: str, layer: LayerState, groups: TimestepGroups, backend: str, device=None):
        super().__init__()
        if backend not in BACKENDS:
            raise ValueError(f"layer '{name}': unknown backend '{backend}', expected one of {BACKENDS}")
        self.name, self.backend = name, backend
        self.row_norm, self.row_max = layer.p_row_norm, layer.p_row_max
        self.__dict__["groups"] = groups
        self.q, self.k, self.v, self.p = (ActTables(layer.acts[a], device) for a in ("q", "k", "v", "p"))
        # the P kinds this layer's groups use, bit 1 << kind id (the Triton op's `p_kinds`): the kernel
        # then writes only the v operand those kinds read
        self.p_kinds = sum(1 << ACT_KINDS.index(k) for k in set(self.p.kinds))

    def normalize(self, attn, hidden_states: torch.Tensor) -> torch.Tensor:
        """With the triton backend, a GroupNorm kernel reading the tokens where they lie and writing them
        contiguous — torch's GroupNorm needs a [B, C, L] copy first, and the q/k/v GEMMs a copy of its
        transposed output each."""
        norm = attn.group_norm
        if self.backend == "triton" and type(norm) is torch.nn.GroupNorm:
            from ..ops import triton_ops

            return triton_ops.call(triton_ops.groupnorm, hidden_states, norm.weight, norm.bias, norm.num_groups,
                                   norm.eps)
        return super().normalize(attn, hidden_states)

    def project_out(self, attn, out: torch.Tensor, residual: torch.Tensor, spatial,
                    block_residual=None) -> torch.Tensor:
        """With the triton backend and a triton `QLinear` as `to_out.0`, the one residual there is added in that
        GEMM's epilogue (one kernel, one rounding): a [B, C, H, W] block's own residual — the result returned as
        a channels-last view, no transpose copy, no separate add or rescale kernel — or, on tokens, a
        transformer block's `block_residual`. Elsewhere diffusers' steps."""
        proj, drop = attn.to_out[0], attn.to_out[1]
        fusable = (self.backend == "triton" and attn.rescale_output_factor == 1 and isinstance(proj, QLinear)
                   and proj.adds_residual and (not drop.training or drop.p == 0))
        if fusable and spatial is not None and attn.residual_connection and block_residual is None:
            batch, channel, height, width = spatial
            res = residual.permute(0, 2, 3, 1).reshape(batch, height * width, channel)  # a view if channels-last
            return proj.add_into(out, res).view(batch, height, width, channel).permute(0, 3, 1, 2)
        if fusable and spatial is None and not attn.residual_connection and block_residual is not None:
            return proj.add_into(out, block_residual)
        return super().project_out(attn, out, residual, spatial, block_residual)

    def attention(self, q, k, v, softmax_scale: float, mask=None) -> torch.Tensor:
        """softmax(QKᵀ·scale + mask)·V on quantized operands; q, k, v are [B, heads, L, d].

        `reference` sums integer products exactly in float64. `simulate` — and `triton` when a mask
        is given — multiply integer-valued fp32 codes (exact while partial sums stay below 2^24)
        with a straight-through gradient. `triton` without a mask runs the fused kernel
        (`tcaq::triton_qattention`, no autograd).
        """
        if self.backend == "triton" and mask is None:
            from ..ops import triton_ops

            qkv_tables = (x for a in (self.q, self.k, self.v) for x in (a.s_inv, a.scale, a.zero))
            return triton_ops.call(
                triton_ops.qattention,
                q, k, v, float(softmax_scale), *qkv_tables,
                self.p.s_inv, self.p.scale, self.p.zero, self.p.kind_ids, self.groups.current(self.name),
                q_bits=self.q.bits, k_bits=self.k.bits, v_bits=self.v.bits, p_bits=self.p.bits,
                p_row_norm=self.row_norm, p_row_max=self.row_max, p_kinds=self.p_kinds,
                out_dtype=q.dtype if q.is_floating_point() else torch.float32)
        exact = self.backend == "reference"
        g = self.groups.current(self.name)
        codes = {}
        scales = {}
        for name, x in (("q", q), ("k", k), ("v", v)):
            tables = getattr(self, name)
            s, s_inv, z = tables.lookup(g, x, self.name)
            c = quantize_uniform(x, s_inv, z, tables.bits)
            # simulate: integer-valued floats with a straight-through gradient, so calibration can
            # backpropagate while computing the very same scores as the integer path.
            codes[name] = c if exact else ste(c.float(), x * s_inv)
            scales[name] = s
        if exact:
            scores = ref.int_attention_scores(codes["q"], codes["k"]).float()
        else:  # exact in fp32 while d·127² < 2^24 (head_dim ≤ 1040)
            scores = torch.matmul(codes["q"], codes["k"].transpose(-1, -2))
        scores = scores * (scales["q"] * scales["k"] * softmax_scale)
        if mask is not None:
            scores = scores + mask
        probs = row_max_exp(scores) if self.row_max else scores.softmax(dim=-1)
        return self._pv(probs, codes["v"], scales["v"], g, exact)

    def _pv(self, probs, v_codes, s_v, g, exact: bool) -> torch.Tensor:
        """P·V per kind: the accumulator Σ_j p̂_j·v_j with p̂ in units of s_p (c − z, or 2^-c), then
        ×(s_p·s_v), with `row_norm` ×`attention_row_scale(Σ_j p̂_j, s_p, s_v)`, or with `row_max` alone
        ×`attention_row_scale(Σ_j y_j, s_p, s_v)`, y = probs·s_inv (the values the codes round)."""
        p = self.p
        s, s_inv, z = p.lookup(g, probs, self.name)
        y_sum = (probs * s_inv).sum(-1, keepdim=True) if self.row_max and not self.row_norm else None
        outs = {}
        if "uniform" in p.kinds:
            c = quantize_uniform(probs, s_inv, z, p.bits)
            if exact:
                acc = ref.int_pv_uniform(c, z, v_codes).float()
                mass = ref.p_row_mass_uniform(c, z) if self.row_norm else y_sum
            else:
                levels = ste(c.float(), probs * s_inv) - z.float()
                acc = torch.matmul(levels, v_codes)
                mass = levels.sum(-1, keepdim=True) if self.row_norm else y_sum  # exact: integers < 2^24
            outs["uniform"] = self._scale(acc, mass, s, s_v)
        if "log2" in p.kinds:
            c = quantize_log2(probs, s_inv, p.bits)
            if exact:
                acc = ref.pv_log2(c, p.bits, v_codes).float()
                mass = ref.p_row_mass_log2(c, p.bits) if self.row_norm else y_sum
            else:
                levels = ste(dequantize_log2(c, torch.ones((), device=c.device), p.bits), probs * s_inv)
                acc = torch.matmul(levels, v_codes)
                mass = levels.sum(-1, keepdim=True) if self.row_norm else y_sum
            outs["log2"] = self._scale(acc, mass, s, s_v)
        if len(outs) == 1:
            return next(iter(outs.values()))
        is_log2 = per_sample(p.kind_ids, g, probs, self.name) == _LOG2
        return torch.where(is_log2, outs["log2"], outs["uniform"])

    @staticmethod
    def _scale(acc, mass, s_p, s_v) -> torch.Tensor:
        if mass is None:
            return acc * (s_p * s_v)
        return acc * attention_row_scale(mass, s_p, s_v)
