"""`QuantSim`: a calibration copy of the float UNet with fake-quant layers, and its export to a state."""
from __future__ import annotations

import copy
from functools import cached_property
from typing import Iterable, Mapping, Optional, Sequence

import torch

from ..quant.layers import model_fingerprint, quantizable_layers, skip_splits
from ..quant.state import CalibState
from .fakequant import FakeQuantAttnProcessor, FakeQuantLayer, GroupIndex
from .settings import layer_act_bits, parse_bits


class QuantSim:
    """A deep copy of `unet` whose quantized layers are trainable fake-quant modules.

    The float `unet` is left untouched (it supplies the full-precision targets). Layers start in
    float mode; the reconstruction switches each block to quantized once it is calibrated.
    """

    def __init__(
        self,
        unet: torch.nn.Module,
        bits: str,
        group_edges: Sequence[float],
        keep_float: Iterable[str] = (),
        group_act_params: bool = True,
        per_group_p: bool = False,
        act_bits: Optional[Mapping[str, int]] = None,
        p_row_norm: bool = False,
        p_row_max: bool = False,
    ):
        w_bits, a_bits = parse_bits(bits)
        self.bits, self.group_edges = bits, list(group_edges)
        self.float_layers = sorted(keep_float)
        self.model = copy.deepcopy(unet).eval().requires_grad_(False)
        device = next(self.model.parameters()).device
        self.index = GroupIndex(self.group_edges, device)
        groups = self.index.num_groups
        act_sets = groups if group_act_params else 1
        p_sets = groups if (group_act_params or per_group_p) else 1
        modules = dict(self.model.named_modules())
        self.kinds = {n: k for n, k in quantizable_layers(self.model).items() if n not in set(keep_float)}
        self.layers: dict[str, torch.nn.Module] = {}
        layer_bits = layer_act_bits(self.kinds, a_bits, act_bits or {})
        for name, kind in self.kinds.items():
            a_bits = layer_bits[name]
            module = modules[name]
            if kind == "attention":
                proc = FakeQuantAttnProcessor(name, a_bits, act_sets, p_sets, self.index, p_row_norm,
                                              p_row_max).to(device)
                module.set_processor(proc)
                self.layers[name] = proc
            else:
                layer = FakeQuantLayer(name, module, kind, w_bits, a_bits, act_sets, self.index).to(device)
                parent_name, _, child = name.rpartition(".")
                setattr(modules[parent_name] if parent_name else self.model, child, layer)
                self.layers[name] = layer
        self.model.register_forward_pre_hook(self.index.hook, with_kwargs=True)

    @property
    def num_groups(self) -> int:
        return self.index.num_groups

    @cached_property
    def skip_splits(self) -> dict[str, int]:
        """`{layer: input_split}` of the quantized layers that read a skip concatenation (quant/layers.py).

        Derived from the module structure on first use only, so a UNet whose skips cannot be
        derived still calibrates with `split_skip=False`.
        """
        return skip_splits(self.model, self.kinds)

    def set_mode(self, names: Iterable[str], weight: str, act: bool) -> None:
        """Weight mode ("float" | "quant" | "soft") and activation quantization of the named layers."""
        for name in names:
            layer = self.layers[name]
            if isinstance(layer, FakeQuantLayer):
                layer.weight_q.mode = weight
            for qz in layer.quantizers().values():
                qz.enabled = act

    def set_observer(self, names: Iterable[str], observer: Optional[object]) -> None:
        for name in names:
            self.layers[name].observer = observer

    def export_state(self, float_unet: torch.nn.Module, method: str, settings: dict) -> CalibState:
        """The CalibState of the current integers and scales (learned rounding, learned steps)."""
        return CalibState(
            method=method,
            bits=self.bits,
            group_edges=self.group_edges,
            model_fingerprint=model_fingerprint(float_unet),
            model_class=type(float_unet).__name__,
            layers={name: layer.export(self.num_groups) for name, layer in self.layers.items()},
            float_layers=self.float_layers,
            settings=settings,
        )
