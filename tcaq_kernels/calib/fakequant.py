"""Trainable fake-quant modules for calibration, built on the primitives, exported into a CalibState.

`nn/`'s simulate backend holds integers and scales as frozen buffers; reconstruction needs the
things it learns to be parameters: AdaRound's rounding variables per weight, and the activation step
sizes (LSQ). These modules compute what the integer model computes — the same TCR basis, the same
`(x·r_inv)·(1/s)` rounding, the same log2 codes — so the exported state behaves as it did here
(tests/calib checks it against `convert(..., backend="simulate")`).
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from ..nn.qattention import ExplicitAttnProcessor
from ..quant.primitives import (
    attention_row_scale,
    fake_quant_log2,
    fake_quant_uniform,
    pack_int4,
    qrange,
    quantize_weight,
    row_max_exp,
    weight_scale_symmetric,
)
from ..quant.state import SKIP_ACT, ActQuant, LayerState, input_ranges
from .qparams import weight_scale_mse
from .tcr import fold_weight, unfold_input


class GroupIndex:
    """The per-sample timestep group (and calibration step) that every fake-quant module reads.

    A pre-hook on the model sets it from the `timestep` argument, exactly as `convert`'s
    `TimestepGroups` does (fp32 bucketize, right-closed); block replays set it from the cache.
    """

    def __init__(self, edges: Sequence[float], device=None):
        self.edges = torch.tensor(list(edges), dtype=torch.float32, device=device)
        self.group = torch.zeros(1, dtype=torch.long, device=device)
        self.step: Optional[torch.Tensor] = None

    @property
    def num_groups(self) -> int:
        return self.edges.numel() + 1

    def groups_of(self, timesteps) -> torch.Tensor:
        t = torch.as_tensor(timesteps).to(device=self.edges.device, dtype=torch.float32).reshape(-1)
        return torch.bucketize(t, self.edges, right=True)

    def set(self, group: torch.Tensor, step: Optional[torch.Tensor] = None) -> None:
        self.group, self.step = group, step

    def hook(self, module, args, kwargs) -> None:
        """Model forward pre-hook: per-sample groups from `timestep` (a scalar is broadcast)."""
        sample = args[0] if args else kwargs["sample"]
        timestep = args[1] if len(args) > 1 else kwargs["timestep"]
        g = self.groups_of(timestep)
        self.set(g.expand(sample.shape[0]) if g.numel() == 1 else g)


def _per_sample(table: torch.Tensor, rows: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    values = table[rows]
    return values.view(values.shape[0], *([1] * (like.dim() - 1)))


class ActQuantizer(torch.nn.Module):
    """One activation quantizer: per-set (timestep group, or one shared set) scale, zero and kind.

    The step size is learned as log(scale) so that one Adam learning rate means the same relative
    change for every layer, whatever its range. Zero points stay fixed (as in LSQ/Q-Diffusion).
    log2 sets use their scale as a searched constant: through the straight-through rounding of log2(x/s)
    the output does not depend on s at all. With `learn_log2_scale` they learn it with the codes held
    fixed (∂x̂/∂s = x̂/s: a gain on the whole map, which is what moves a row's mass).
    """

    def __init__(self, bits: int, num_sets: int, symmetric: bool, index: GroupIndex):
        super().__init__()
        self.bits, self.symmetric, self.index = bits, symmetric, index
        self.log_scale = torch.nn.Parameter(torch.zeros(num_sets), requires_grad=False)
        self.register_buffer("zero", torch.zeros(num_sets, dtype=torch.int32))
        self.register_buffer("is_log2", torch.zeros(num_sets, dtype=torch.bool))  # kinds, on the device
        self.kinds = ["uniform"] * num_sets
        self.initialized = [False] * num_sets
        self.enabled = False
        self.learn_log2_scale = False  # set per block by reconstruction (MethodConfig.learn_log2_scale)

    @property
    def num_sets(self) -> int:
        return len(self.kinds)

    def set_params(self, row: int, scale: float, zero: int = 0, kind: str = "uniform") -> None:
        if not (math.isfinite(scale) and scale > 0):
            raise ValueError(f"ActQuantizer.set_params: scale {scale} must be finite and positive")
        if kind not in ("uniform", "log2"):
            raise ValueError(f"ActQuantizer.set_params: unknown quantizer kind {kind!r}")
        with torch.no_grad():
            self.log_scale[row] = math.log(scale)
            self.zero[row] = int(zero)
            self.is_log2[row] = kind == "log2"
        self.kinds[row], self.initialized[row] = kind, True

    def scale(self) -> torch.Tensor:
        return self.log_scale.exp()

    def _rows(self) -> torch.Tensor:
        group = self.index.group
        return group if self.num_sets > 1 else torch.zeros_like(group)

    def forward(self, x: torch.Tensor, r: Optional[torch.Tensor] = None, channel_dim: int = 1) -> torch.Tensor:
        """Fake-quantized x·r⁻¹ (the TCR basis); x·r⁻¹ unquantized while disabled."""
        if not self.enabled:
            return unfold_input(x, r, channel_dim)
        rows = self._rows()
        scale = _per_sample(self.scale(), rows, x)
        zero = _per_sample(self.zero, rows, x)
        r_inv = None if r is None else 1.0 / r.float()
        kinds = set(self.kinds)
        uniform = log2 = None
        if "uniform" in kinds:
            uniform = fake_quant_uniform(x, scale, zero, self.bits, r_inv, channel_dim)
        if "log2" in kinds:
            if r is not None:
                raise ValueError("log2 quantizers are for post-softmax maps, which have no TCR factor")
            log2 = fake_quant_log2(x, scale.detach(), self.bits)
            if self.learn_log2_scale:  # value ×1 exactly; the gradient of a fixed-code gain
                log2 = log2 * (scale / scale.detach())
        if log2 is None:
            return uniform
        if uniform is None:
            return log2
        return torch.where(_per_sample(self.is_log2, rows, x), log2, uniform)

    def export(self, num_groups: int, where: str) -> ActQuant:
        """Per-group tables for the state (a shared set is repeated for every group)."""
        if not all(self.initialized):
            missing = [i for i, ok in enumerate(self.initialized) if not ok]
            raise RuntimeError(f"{where}: activation quantizer sets {missing} were never initialised")
        rows = list(range(num_groups)) if self.num_sets > 1 else [0] * num_groups
        return ActQuant(
            bits=self.bits,
            kind=[self.kinds[i] for i in rows],
            scale=self.scale().detach().float().cpu()[rows].clone(),
            zero=self.zero.detach().cpu()[rows].clone(),
        )


class AdaRoundWeight(torch.nn.Module):
    """Per-output-channel symmetric weights in the TCR basis (`w·r`), with learnable rounding.

    AdaRound (Nagel et al. 2020): `ŵ = s·clamp(⌊w·r/s⌋ + h(V))` with the rectified sigmoid h; V is
    initialised so that h(V) equals the fractional part (the soft weight starts at the float one)
    and a regulariser pushes h to 0 or 1. Until V is learned, the quantized weight is the nearest
    rounding of `quantize_weight`, bit for bit.
    """

    ZETA, GAMMA = 1.1, -0.1

    def __init__(self, weight: torch.Tensor, bits: int):
        super().__init__()
        self.bits = bits
        self.register_buffer("weight", weight.detach().float().clone())
        self.register_buffer("r", None)
        self.register_buffer("scale", weight_scale_symmetric(self.weight, bits))
        self.register_buffer("base", torch.zeros_like(self.weight))
        self.alpha = torch.nn.Parameter(torch.zeros_like(self.weight), requires_grad=False)
        self.mode = "float"  # "float" | "quant" | "soft"
        self.learned = False

    def setup(self, r: Optional[torch.Tensor], scale_rule: str) -> None:
        """Fix the TCR factor and the scale, and start V at the float weight."""
        self.r = None if r is None else r.float().to(self.weight.device)
        folded = fold_weight(self.weight, self.r)
        if scale_rule == "mse":
            self.scale = weight_scale_mse(self.weight, self.bits, self.r)
        else:
            self.scale = weight_scale_symmetric(self.weight, self.bits, self.r)
        ratio = folded / self._scale_view()
        self.base = torch.floor(ratio)
        rest = (ratio - self.base).clamp(1e-4, 1 - 1e-4)
        with torch.no_grad():
            self.alpha.copy_(-torch.log((self.ZETA - self.GAMMA) / (rest - self.GAMMA) - 1))
        self.learned = False

    def _scale_view(self) -> torch.Tensor:
        return self.scale.view(-1, *([1] * (self.weight.dim() - 1)))

    def soft(self) -> torch.Tensor:
        """h(V) ∈ [0, 1]."""
        return torch.clamp(torch.sigmoid(self.alpha) * (self.ZETA - self.GAMMA) + self.GAMMA, 0, 1)

    def regulariser(self, beta: float) -> torch.Tensor:
        return (1 - (2 * self.soft() - 1).abs().pow(beta)).sum()

    def integers(self) -> torch.Tensor:
        """The integer weights (as float) the quantized model uses: learned rounding, else nearest."""
        qmin, qmax = qrange(self.bits)
        if self.learned:
            return torch.clamp(self.base + (self.alpha.detach() >= 0).float(), qmin, qmax)
        return quantize_weight(self.weight, self.scale, self.bits, self.r).float()

    def forward(self) -> torch.Tensor:
        """The weight this layer multiplies with: float `w·r`, or its quantized version."""
        if self.mode == "float":
            return fold_weight(self.weight, self.r)
        if self.mode == "soft":
            qmin, qmax = qrange(self.bits)
            return torch.clamp(self.base + self.soft(), qmin, qmax) * self._scale_view()
        return self.integers() * self._scale_view()


class FakeQuantLayer(torch.nn.Module):
    """A Conv2d or Linear with AdaRound weights and an LSQ input quantizer (TCR-aware).

    A split input (`split_input`, Q-Diffusion's shortcut splitting) gets a second quantizer,
    "input_skip", for channels [split, C_in): each range is fake-quantized with its own step size
    and zero point and the ranges are concatenated again before the one float product, which is
    the integer layer's `acc1·(s_w·s_a1) + acc2·(s_w·s_a2)` up to float summation order.
    """

    def __init__(self, name: str, module: torch.nn.Module, kind: str, w_bits: int, a_bits: int, act_sets: int, index: GroupIndex):
        super().__init__()
        if kind == "conv2d" and (module.groups != 1 or module.padding_mode != "zeros" or isinstance(module.padding, str)):
            raise ValueError(
                f"layer '{name}': only groups=1, zero-padded convs with explicit padding can be quantized "
                f"(got groups={module.groups}, padding={module.padding!r}, padding_mode={module.padding_mode!r}); "
                "add it to keep_float"
            )
        self.name, self.kind = name, kind
        self.channel_dim = 1 if kind == "conv2d" else -1
        if kind == "conv2d":
            self.stride, self.padding, self.dilation = tuple(module.stride), tuple(module.padding), tuple(module.dilation)
        self.register_buffer("bias", None if module.bias is None else module.bias.detach().float().clone())
        self.weight_q = AdaRoundWeight(module.weight, w_bits)
        self.act_q = ActQuantizer(a_bits, act_sets, symmetric=False, index=index)
        self.act_skip_q: Optional[ActQuantizer] = None
        self.input_split: Optional[int] = None
        self.observer = None

    @property
    def tcr(self) -> Optional[torch.Tensor]:
        return self.weight_q.r

    @property
    def in_channels(self) -> int:
        return self.weight_q.weight.shape[1]

    def split_input(self, split: Optional[int]) -> None:
        """Quantize input channels [split, C_in) with a quantizer of their own; None: one for all.

        Initialisation calls it (the split is the method's choice, `MethodConfig.split_skip`, at a
        point the UNet's structure gives, `quant.layers.skip_splits`); a new split starts with an
        uninitialised "input_skip" quantizer, so export fails until initialisation has set it.
        """
        if split is not None and not 0 < split < self.in_channels:
            raise ValueError(f"layer '{self.name}': input_split {split} must lie strictly inside the "
                             f"{self.in_channels} input channels")
        if split == self.input_split:
            return
        self.input_split = split
        self.act_skip_q = None
        if split is not None:
            skip = ActQuantizer(self.act_q.bits, self.act_q.num_sets, symmetric=False, index=self.act_q.index)
            skip.enabled = self.act_q.enabled
            self.act_skip_q = skip.to(self.act_q.zero.device)

    def input_ranges(self) -> list[tuple[str, int, int]]:
        """(quantizer name, first channel, end channel) of each input channel range."""
        return input_ranges(self.input_split, self.in_channels)

    def quantizers(self) -> dict[str, "ActQuantizer"]:
        """The layer's activation quantizers by state name (reconstruction learns their step sizes)."""
        if self.act_skip_q is None:
            return {"input": self.act_q}
        return {"input": self.act_q, SKIP_ACT: self.act_skip_q}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.observer is not None:
            self.observer.record(self, "input", x)
        r = self.tcr
        if self.weight_q.mode == "float" and not any(q.enabled for q in self.quantizers().values()):
            r = None  # the float layer itself: skip the (exactly cancelling) reparameterisation
            w = self.weight_q.weight
        else:
            w = self.weight_q()
        xq = self.quantize_input(x, r)
        return self.product(xq.to(x.dtype), w.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

    def quantize_input(self, x: torch.Tensor, r: Optional[torch.Tensor]) -> torch.Tensor:
        """Fake-quantized x·r⁻¹, each input channel range by its own quantizer."""
        if self.input_split is None:
            return self.act_q(x, r, self.channel_dim)
        quantizers, dim = self.quantizers(), self.channel_dim
        parts = [quantizers[act](x.narrow(dim, lo, hi - lo), None if r is None else r[lo:hi], dim)
                 for act, lo, hi in self.input_ranges()]
        return torch.cat(parts, dim=dim)

    def product(self, x: torch.Tensor, w: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The layer's conv / matmul with weight `w`."""
        if self.kind == "conv2d":
            return F.conv2d(x, w, bias, self.stride, self.padding, self.dilation)
        return F.linear(x, w, bias)

    def export(self, num_groups: int) -> LayerState:
        w_int = self.weight_q.integers().to(torch.int8).cpu()
        flat = w_int.flatten(1)
        return LayerState(
            kind=self.kind,
            acts={a: qz.export(num_groups, f"layer '{self.name}' {a}") for a, qz in self.quantizers().items()},
            w_bits=self.weight_q.bits,
            weight=pack_int4(flat) if self.weight_q.bits == 4 else flat,
            weight_shape=tuple(w_int.shape),
            weight_scale=self.weight_q.scale.detach().float().cpu().clone(),
            tcr=None if self.tcr is None else self.tcr.detach().float().cpu().clone(),
            input_split=self.input_split,
        )


class FakeQuantAttnProcessor(ExplicitAttnProcessor):
    """Attention with fake-quantized q, k, v (symmetric) and post-softmax P (uniform or log2 per set);
    with `p_row_norm` the quantized P is divided by its row mass (`attention_row_scale`, in value units:
    s_p(c − z) / Σ s_p(c − z) is the integer model's (c − z) / Σ(c − z) up to float rounding).

    With `p_row_max` the map quantized (and observed as "p") is e = exp(S − row max) (`row_max_exp`)
    and P̂·V is divided by the float Σ_j e_j — the integer model's division by Σ_j e_j·s_inv, with s_p
    cancelling, up to float rounding; with `p_row_norm` as well, the quantized mass divides instead."""

    def __init__(self, name: str, a_bits: int, qkv_sets: int, p_sets: int, index: GroupIndex, p_row_norm: bool = False,
                 p_row_max: bool = False):
        super().__init__()
        self.name, self.p_row_norm, self.p_row_max = name, p_row_norm, p_row_max
        self.q, self.k, self.v = (ActQuantizer(a_bits, qkv_sets, True, index) for _ in range(3))
        self.p = ActQuantizer(a_bits, p_sets, False, index)
        self.observer = None

    def quantizers(self) -> dict[str, ActQuantizer]:
        return {"q": self.q, "k": self.k, "v": self.v, "p": self.p}

    def attention(self, q, k, v, softmax_scale, mask=None):
        if self.observer is not None:
            for act, x in (("q", q), ("k", k), ("v", v)):
                self.observer.record(self, act, x)
        q, k, v = self.q(q.float()), self.k(k.float()), self.v(v.float())
        scores = torch.matmul(q, k.transpose(-1, -2)) * softmax_scale
        if mask is not None:
            scores = scores + mask
        probs = row_max_exp(scores) if self.p_row_max else scores.softmax(dim=-1)
        if self.observer is not None:
            self.observer.record(self, "p", probs)
        p_hat = self.p(probs)
        row_norm = self.p_row_norm and self.p.enabled
        if row_norm:
            one = torch.ones((), device=p_hat.device)
            p_hat = p_hat * attention_row_scale(p_hat.sum(-1, keepdim=True), one, one)
        out = torch.matmul(p_hat, v)
        if self.p_row_max and not row_norm:  # Σ e ≥ 1 (each row's largest entry is exactly 1): no empty row
            out = out / probs.sum(-1, keepdim=True)
        return out

    def export(self, num_groups: int) -> LayerState:
        acts = {a: qz.export(num_groups, f"layer '{self.name}' {a}") for a, qz in self.quantizers().items()}
        return LayerState(kind="attention", acts=acts, p_row_norm=self.p_row_norm, p_row_max=self.p_row_max)
