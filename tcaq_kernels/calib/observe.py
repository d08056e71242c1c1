"""Observe a float UNet while it samples: per-layer, per-timestep-group activation ranges.

Hooks and an observing attention processor are attached for the duration of a `with` block and
removed afterwards, leaving the model exactly as it was (no patched model code).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from ..nn.qattention import ExplicitAttnProcessor
from ..quant.primitives import row_max_exp
from ..quant.state import input_ranges, layer_acts


class _ObservingAttnProcessor(ExplicitAttnProcessor):
    """Float attention written out (QKᵀ, softmax, P·V) so q, k, v and P can be observed.

    "p" is the map the state will quantize: the softmax, or with the observer's `p_row_max`
    exp(S − row max) (`row_max_exp`). The output is softmax·V either way, so observing leaves the float
    trajectory bit for bit what it is without the flag."""

    def __init__(self, observer: "RangeObserver", name: str):
        super().__init__()
        self.__dict__["observer"] = observer
        self.name = name

    def attention(self, q, k, v, softmax_scale, mask=None):
        scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) * softmax_scale
        if mask is not None:
            scores = scores + mask
        probs = scores.softmax(dim=-1)
        p_map = row_max_exp(scores) if self.observer.p_row_max else probs
        for act, x in (("q", q), ("k", k), ("v", v), ("p", p_map)):
            self.observer.record(self.name, act, x)
        return torch.matmul(probs, v.float())


class RangeObserver:
    """Running min/max of every quantized layer's activation quantizers, per timestep group.

    `stats[(layer, act)]` is a float64 tensor [G, 2] of (min, max); groups that never ran keep
    (+inf, −inf), which the state builder reports by name. `splits` (`{layer: input_split}`, see
    quant.layers.skip_splits) gives those layers' input channel ranges separate ranges, "input"
    and "input_skip". `p_row_max`: attention layers' "p" ranges are those of exp(S − row max), the
    map a `p_row_max` state quantizes (calib/config.py), not of the softmax.
    """

    def __init__(self, unet: torch.nn.Module, layers: dict[str, str], group_edges: Sequence[float],
                 splits: Optional[dict[str, int]] = None, p_row_max: bool = False):
        self.unet, self.layers, self.splits, self.p_row_max = unet, layers, dict(splits or {}), p_row_max
        self.edges = torch.tensor(list(group_edges), dtype=torch.float64)
        groups = len(group_edges) + 1
        self.stats = {
            (name, act): torch.tensor([[float("inf"), float("-inf")]] * groups, dtype=torch.float64)
            for name, kind in layers.items()
            for act in layer_acts(kind, self.splits.get(name))
        }
        self.group = 0
        self._handles, self._processors = [], {}

    def record(self, name: str, act: str, x: torch.Tensor) -> None:
        """Fold `x` into the current group's range, on x's device (no host sync per layer)."""
        key = (name, act)
        stats = self.stats[key]
        if stats.device != x.device:
            stats = self.stats[key] = stats.to(x.device)
        lo, hi = torch.aminmax(x.detach().to(torch.float64))
        stats[self.group, 0] = torch.minimum(stats[self.group, 0], lo)
        stats[self.group, 1] = torch.maximum(stats[self.group, 1], hi)

    def _on_unet(self, module, args, kwargs):
        timestep = args[1] if len(args) > 1 else kwargs["timestep"]
        t = torch.as_tensor(timestep, dtype=torch.float64).reshape(-1).cpu()
        if t.numel() > 1 and not (t == t[0]).all():
            raise ValueError("calibration expects one timestep per UNet call")
        self.group = int(torch.bucketize(t[:1], self.edges, right=True).item())

    def __enter__(self) -> "RangeObserver":
        self._handles.append(self.unet.register_forward_pre_hook(self._on_unet, with_kwargs=True))
        modules = dict(self.unet.named_modules())
        for name, kind in self.layers.items():
            module = modules[name]
            if kind == "attention":
                self._processors[name] = module.processor
                module.set_processor(_ObservingAttnProcessor(self, name))
            else:
                hook = lambda mod, args, _n=name, _k=kind: self._record_input(_n, _k, args[0])  # noqa: E731
                self._handles.append(module.register_forward_pre_hook(hook))
        return self

    def _record_input(self, name: str, kind: str, x: torch.Tensor) -> None:
        """A weighted layer's input, one range per input quantizer (two for a split input)."""
        dim = 1 if kind == "conv2d" else -1
        for act, lo, hi in input_ranges(self.splits.get(name), x.shape[dim]):
            self.record(name, act, x.narrow(dim, lo, hi - lo))

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        modules = dict(self.unet.named_modules())
        for name, processor in self._processors.items():
            modules[name].set_processor(processor)
        self._handles, self._processors = [], {}
