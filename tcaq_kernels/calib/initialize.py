"""The initialisation stage of one block: TCR factors, DAQ choices, weight scales, activation qparams.

The block runs in float on its captured inputs while an observer records what each quantizer will
see. TCR needs a pass of its own (its range table m[t, c] must be complete before r, and with it the
activation range x·r⁻¹, is known); the second pass samples activation values in the TCR basis, per
timestep group, for the MSE searches and the DAQ fits.
"""
from __future__ import annotations

from collections import defaultdict
from typing import Optional

import torch

from ..quant.primitives import dequantize_weight, fake_quant_uniform, quantize_weight, weight_scale_symmetric
from .blocks import Block, BlockIO, first_tensor
from .config import MethodConfig
from .daq import decide
from .fakequant import ActQuantizer, FakeQuantAttnProcessor, FakeQuantLayer
from .qmodel import QuantSim
from .qparams import symmetric_qparams, uniform_qparams, weight_scale_mse
from .tcr import accumulate_absmax, channel_absmax, tcr_factors, unfold_input, with_strength


class InitObserver:
    """Records, per quantizer and timestep group: a random value sample and the exact range.

    Mode "tcr" only fills the TCR range tables of the layers that use TCR; mode "inputs" keeps those
    layers' raw inputs (with their groups) for the TCR strength search.
    """

    def __init__(self, sim: QuantSim, tcr_layers: dict[str, int], tcr_rows: Optional[str], per_call: int, seed: int):
        self.sim, self.mode = sim, "values"
        self.tcr_layers, self.tcr_rows = tcr_layers, tcr_rows  # name → number of rows; "step" | "group"
        self.tcr_m: dict[str, torch.Tensor] = {}
        self.inputs: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = defaultdict(list)
        self.values: dict[tuple[str, str, int], list[torch.Tensor]] = defaultdict(list)
        self.range: dict[tuple[str, str, int], list[float]] = {}
        self.per_call = per_call
        self.device = torch.device("cpu")  # where the values were recorded: the MSE searches run there
        self.gen = torch.Generator().manual_seed(seed)

    def record(self, layer, act: str, x: torch.Tensor) -> None:
        if self.mode in ("tcr", "inputs"):
            if act != "input" or layer.name not in self.tcr_layers:
                return
            if self.mode == "inputs":
                self.inputs[layer.name].append((x.detach().float(), self.sim.index.group.expand(x.shape[0])))
                return
            rows = self.sim.index.step if self.tcr_rows == "step" else self.sim.index.group
            m = self.tcr_m.get(layer.name)
            if m is None:
                m = self.tcr_m[layer.name] = torch.zeros(self.tcr_layers[layer.name], x.shape[layer.channel_dim], device=x.device)
            accumulate_absmax(m, rows, channel_absmax(x.float(), layer.channel_dim))
            return
        x = x.detach().float()
        if act != "input":
            self._record_values(layer.name, act, x)
            return
        x, dim = unfold_input(x, layer.tcr, layer.channel_dim), layer.channel_dim
        for range_act, lo, hi in layer.input_ranges():  # a split input: each range for its own quantizer
            self._record_values(layer.name, range_act, x.narrow(dim, lo, hi - lo))

    def _record_values(self, layer: str, act: str, x: torch.Tensor) -> None:
        """Fold `x` (batch first) into the per-group range and value sample of quantizer `act`."""
        self.device = x.device
        groups = self.sim.index.group.to(x.device).expand(x.shape[0])
        for g in groups.unique().tolist():
            flat = x[groups == g].reshape(-1)
            key = (layer, act, g)
            lo, hi = flat.min().item(), flat.max().item()
            old = self.range.get(key)
            self.range[key] = [lo, hi] if old is None else [min(old[0], lo), max(old[1], hi)]
            if flat.numel() > self.per_call:
                idx = torch.randint(0, flat.numel(), (self.per_call,), generator=self.gen).to(flat.device)
                flat = flat[idx]
            self.values[key].append(flat.cpu())

    def sample(self, layer: str, act: str, groups: list[int], limit: int) -> tuple[torch.Tensor, float, float]:
        """Pooled value sample (≤ limit, plus the exact extremes) and exact range over `groups`, on the
        device the values were recorded on: the samples wait in host memory, but the MSE searches over
        them (thousands per calibration) run on the GPU, where they take no host CPU time."""
        keys = [(layer, act, g) for g in groups if (layer, act, g) in self.range]
        if not keys:
            raise RuntimeError(
                f"layer '{layer}': activation '{act}' was never observed in timestep groups {groups}; "
                "use more calibration points or fewer timestep groups"
            )
        lo = min(self.range[k][0] for k in keys)
        hi = max(self.range[k][1] for k in keys)
        values = torch.cat([v for k in keys for v in self.values[k]])
        if values.numel() > limit:
            values = values[torch.randperm(values.numel(), generator=self.gen)[:limit]]
        return torch.cat([values, torch.tensor([lo, hi])]).to(self.device), lo, hi


def replay(sim: QuantSim, block: Block, io: BlockIO, idx: torch.Tensor, batch_size: int, grad: bool = False):
    """Run `block` of the sim on the captured points `idx`, batch by batch; yields (batch idx, output)."""
    module = sim.model.get_submodule(block.name)
    for lo in range(0, idx.numel(), batch_size):
        b = idx[lo : lo + batch_size]
        sim.index.set(io.groups[b], io.steps[b])
        args, kwargs = io.call_args(b)
        with torch.set_grad_enabled(grad):
            out = module(*args, **kwargs)
        yield b, first_tensor(out)


def init_point_indices(n: int, limit: Optional[int], device) -> torch.Tensor:
    """Evenly spaced point indices (points are time-major, so every step stays represented)."""
    if limit is None or limit >= n:
        return torch.arange(n, device=device)
    return torch.linspace(0, n - 1, limit, device=device).round().long().unique()


def initialize_block(sim: QuantSim, block: Block, io: BlockIO, cfg: MethodConfig, num_steps: int) -> dict:
    """Set TCR, weight scales and activation qparams of every layer in `block`.

    Returns the decisions made: {"daq": {layer: [per-group record]}, "tcr": {layer: strength}}.
    """
    idx = init_point_indices(len(io), cfg.init_points, io.groups.device)
    layers = {n: sim.layers[n] for n in block.layers}
    for name, layer in layers.items():
        if isinstance(layer, FakeQuantLayer):
            layer.split_input(sim.skip_splits.get(name) if cfg.split_skip else None)
    tcr_rows = num_steps if cfg.tcr_granularity == "step" else sim.num_groups
    tcr_layers = {
        n: tcr_rows for n, l in layers.items()
        if cfg.tcr and isinstance(l, FakeQuantLayer) and (l.kind == "conv2d" or cfg.tcr_linear)
    }
    per_call = max(1, max(cfg.init_values, cfg.daq_values) // 4)
    search = len(cfg.tcr_strengths) > 1
    observer = InitObserver(sim, tcr_layers, cfg.tcr_granularity, per_call, cfg.seed)
    tcr_records: dict[str, float] = {}
    sim.set_mode(block.layers, weight="float", act=False)
    sim.set_observer(block.layers, observer)
    try:
        if tcr_layers:
            observer.mode = "tcr"
            for _ in replay(sim, block, io, idx, cfg.batch_size):
                pass
            if search:  # inputs of evenly spread points, so every timestep weighs in
                observer.mode = "inputs"
                for _ in replay(sim, block, io, init_point_indices(len(io), cfg.tcr_search_points, idx.device), cfg.batch_size):
                    pass
            for name in tcr_layers:
                r_full = range_tcr_factors(observer.tcr_m[name], layers[name].input_ranges())
                if search:
                    xs, gs = (torch.cat(t) for t in zip(*observer.inputs.pop(name)))
                    strength = search_tcr_strength(layers[name], xs, gs, r_full, cfg, sim.num_groups)
                else:
                    strength = cfg.tcr_strengths[0]
                layers[name].weight_q.r = with_strength(r_full, strength, cfg.tcr_clamp)
                tcr_records[name] = strength
        observer.mode = "values"
        for _ in replay(sim, block, io, idx, cfg.batch_size):
            pass
    finally:
        sim.set_observer(block.layers, None)
    daq_records = {}
    for name, layer in layers.items():
        if isinstance(layer, FakeQuantLayer):
            layer.weight_q.setup(layer.weight_q.r, cfg.weight_scale)
            for act, qz in layer.quantizers().items():
                _init_uniform(observer, name, act, qz, cfg, sim.num_groups)
        else:
            daq_records.update(_init_attention(observer, name, layer, cfg, sim.num_groups))
    return {"daq": daq_records, "tcr": tcr_records}


def range_tcr_factors(m: torch.Tensor, ranges: list[tuple[str, int, int]]) -> torch.Tensor:
    """TCR factors of each input channel range on its own, concatenated.

    [ours] The ranges of a split input have quantizers of their own, so each range is balanced
    within itself (its own min-range channel sets s[t]); balancing the skip range against the
    other would only scale it as a whole, which its own step size already does, at the price of
    larger r (clamped) and a wider weight range.
    """
    return torch.cat([tcr_factors(m[:, lo:hi]) for _, lo, hi in ranges])


def _group_qparams(u: torch.Tensor, rows: torch.Tensor, num_rows: int, bits: int, rule: str, limit: int, gen):
    """Per-row (scale, zero) tables for the values `u` [B, …] whose samples belong to set `rows`."""
    scales, zeros = torch.ones(num_rows), torch.zeros(num_rows, dtype=torch.int32)
    for row in rows.unique().tolist():
        flat = u[rows == row].reshape(-1)
        lo, hi = flat.min().item(), flat.max().item()
        if flat.numel() > limit:
            flat = flat[torch.randint(0, flat.numel(), (limit,), generator=gen).to(flat.device)]
        # on the values' device: the TCR strength search runs this per strength and group of every layer
        scale, zero = uniform_qparams(torch.cat([flat, torch.tensor([lo, hi], device=flat.device)]), lo, hi, bits, rule)
        scales[row], zeros[row] = float(scale), int(zero)
    return scales.to(u.device), zeros.to(u.device)


@torch.no_grad()
def search_tcr_strength(layer: FakeQuantLayer, x: torch.Tensor, groups: torch.Tensor, r_full: torch.Tensor,
                        cfg: MethodConfig, num_groups: int) -> float:
    """The strength in `cfg.tcr_strengths` whose quantized layer output is closest to the float one.

    Each candidate quantizes the weights (nearest rounding, `cfg.weight_scale` rule) and the inputs
    (per-set qparams by `cfg.act_init`, as the layer will have them) in its own TCR basis.
    """
    w = layer.weight_q.weight
    reference = layer.product(x, w)
    rows = groups if layer.act_q.num_sets > 1 else torch.zeros_like(groups)
    gen = torch.Generator().manual_seed(cfg.seed)
    quantizers, dim = layer.quantizers(), layer.channel_dim
    best, best_err = 0.0, float("inf")
    for strength in cfg.tcr_strengths:
        r = with_strength(r_full, strength, cfg.tcr_clamp)
        r = None if r is None else r.to(x.device)
        if cfg.weight_scale == "mse":  # a coarser grid than setup()'s: the search only ranks strengths
            s_w = weight_scale_mse(w, layer.weight_q.bits, r, grid=25)
        else:
            s_w = weight_scale_symmetric(w, layer.weight_q.bits, r)
        w_q = dequantize_weight(quantize_weight(w, s_w, layer.weight_q.bits, r), s_w)
        u = unfold_input(x, r, dim)
        x_q = torch.cat([_fake_quant_as_initialised(u.narrow(dim, lo, hi - lo), rows, quantizers[act], cfg, gen)
                         for act, lo, hi in layer.input_ranges()], dim=dim)
        err = (layer.product(x_q, w_q) - reference).pow(2).sum().item()
        if err < best_err:
            best, best_err = strength, err
    return best


def _fake_quant_as_initialised(u: torch.Tensor, rows: torch.Tensor, qz: ActQuantizer, cfg: MethodConfig, gen) -> torch.Tensor:
    """`u` fake-quantized with the per-set qparams `qz` would be initialised with (`cfg.act_init`)."""
    scales, zeros = _group_qparams(u, rows, qz.num_sets, qz.bits, cfg.act_init, cfg.init_values, gen)
    view = (-1,) + (1,) * (u.dim() - 1)
    return fake_quant_uniform(u, scales[rows].view(view), zeros[rows].view(view), qz.bits)


def _set_rows(qz: ActQuantizer, num_groups: int):
    """(set row, groups it pools) pairs: one row per group, or one shared row for all groups."""
    if qz.num_sets == 1:
        return [(0, list(range(num_groups)))]
    return [(g, [g]) for g in range(num_groups)]


def _init_uniform(observer: InitObserver, name: str, act: str, qz: ActQuantizer, cfg: MethodConfig, num_groups: int) -> None:
    for row, groups in _set_rows(qz, num_groups):
        values, lo, hi = observer.sample(name, act, groups, cfg.init_values)
        if qz.symmetric:
            scale, zero = symmetric_qparams(values, max(abs(lo), abs(hi)), qz.bits, cfg.act_init)
        else:
            scale, zero = uniform_qparams(values, lo, hi, qz.bits, cfg.act_init)
        qz.set_params(row, float(scale), int(zero))


def _init_attention(observer: InitObserver, name: str, proc: FakeQuantAttnProcessor, cfg: MethodConfig, num_groups: int) -> dict:
    for act in ("q", "k", "v"):
        _init_uniform(observer, name, act, getattr(proc, act), cfg, num_groups)
    if not cfg.daq:
        _init_uniform(observer, name, "p", proc.p, cfg, num_groups)
        return {}
    records = []
    for row, groups in _set_rows(proc.p, num_groups):
        values, _, _ = observer.sample(name, "p", groups, cfg.daq_values)
        d = decide(values, proc.p.bits, cfg.daq_alternative, cfg.daq_pvalue, cfg.daq_xmin_quantiles, cfg.daq_rule)
        if d.kind == "log2":
            proc.p.set_params(row, d.log2_scale, 0, "log2")
        else:
            proc.p.set_params(row, d.uniform_scale, d.uniform_zero, "uniform")
        records.append(d.as_dict())
    return {name: records}
