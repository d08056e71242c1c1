"""BRECQ-style block reconstruction: AdaRound weights and LSQ activation steps, block by block.

For each block in execution order: capture its inputs (from the partly quantized model, or the
float one) and its full-precision outputs, initialise its quantizers (first round only), then
minimise ‖block_q(x) − block_fp(x)‖² plus AdaRound's rounding regulariser over its rounding
variables and activation step sizes jointly. The block then stays quantized (hard rounding) while
the following blocks are calibrated on its outputs.

Loss convention (BRECQ): squared error summed over channels, averaged over batch and positions.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from tqdm.auto import tqdm

from .blocks import Block, BlockIO, block_io, capture_targets, first_tensor
from .config import MethodConfig
from .data import CalibPoints
from .fakequant import FakeQuantLayer
from .initialize import init_point_indices, initialize_block, replay
from .qmodel import QuantSim

#: eager steps before a step is captured (optimizer state and allocator warm-up, as capture needs)
CUDA_GRAPH_WARMUP = 3


def beta_schedule(it: int, iters: int, warmup: float, start: float, end: float) -> Optional[float]:
    """AdaRound's temperature at step `it`; None during warm-up (regulariser off)."""
    warm = int(warmup * iters)
    if it < warm:
        return None
    progress = (it - warm) / max(1, iters - warm)
    return end + (start - end) * max(0.0, 1.0 - progress)


def reconstruction_loss(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    diff = (out.float() - target.float()).pow(2)
    return diff.sum(dim=1).mean() if diff.dim() > 1 else diff.mean()


def block_error(sim: QuantSim, block: Block, io: BlockIO, batch_size: int) -> float:
    """Mean reconstruction loss of the block as it is now, over every captured point."""
    idx = torch.arange(len(io), device=io.groups.device)
    total = 0.0
    for b, out in replay(sim, block, io, idx, batch_size):
        total += reconstruction_loss(out, io.target[b]).item() * b.numel()
    return total / len(io)


def cosine_lr(base: float, it: int, iters: int) -> float:
    """Cosine annealing to 0 over `iters` steps (the closed form of torch's CosineAnnealingLR)."""
    return 0.5 * base * (1.0 + math.cos(math.pi * it / max(1, iters)))


def _set_lr(opt: Optional[torch.optim.Optimizer], value: float) -> None:
    """Set every group's lr; a tensor lr (CUDA-graph captured optimizer) is updated in place."""
    if opt is None:
        return
    for group in opt.param_groups:
        if torch.is_tensor(group["lr"]):
            group["lr"].fill_(value)
        else:
            group["lr"] = value


def _adam(params: list[torch.Tensor], lr: float, graphed: bool) -> Optional[torch.optim.Optimizer]:
    if not params:
        return None
    if graphed:  # step count and lr live on the device, so a captured step can be replayed
        return torch.optim.Adam(params, lr=torch.tensor(lr, device=params[0].device), capturable=True)
    return torch.optim.Adam(params, lr=lr)


def _use_cuda_graph(cfg: MethodConfig, device: torch.device) -> bool:
    return cfg.cuda_graphs and device.type == "cuda"


class _Stepper:
    """One reconstruction step over static tensors, so it can run eagerly or as a replayed CUDA graph.

    Everything that changes from step to step lives on the device: the batch indices are drawn for
    all steps up front and read at a device-side step counter, the regulariser's temperature and
    switch are 0-d tensors filled before each step, and the optimizers keep tensor learning rates.
    That makes the eager and the captured step the same computation, and a captured step costs one
    graph launch instead of the hundreds of kernel launches a block's forward + backward + Adam
    issue (the reconstruction of the reference model was launch-bound: 9–16 ms a step on an H100).
    """

    def __init__(self, sim: QuantSim, block: Block, io: BlockIO, cfg: MethodConfig, iters: int, weights, optimizers):
        device = io.groups.device
        gen = torch.Generator(device=device).manual_seed(cfg.seed)
        self.draws = torch.randint(0, len(io), (max(1, iters), min(cfg.recon_batch_size, len(io))), generator=gen, device=device)
        self.counter = torch.zeros(1, dtype=torch.long, device=device)
        self.beta = torch.full((), cfg.beta_start, device=device)
        self.reg_weight = torch.zeros((), device=device)
        self.sim, self.io, self.weights, self.optimizers = sim, io, weights, optimizers
        self.module = sim.model.get_submodule(block.name)
        self.rec = self.reg = None

    def set_schedule(self, beta: Optional[float], round_weight: float) -> None:
        """Temperature and weight of the rounding regulariser for the next step (0 while warming up)."""
        if beta is not None:
            self.beta.fill_(beta)
        self.reg_weight.fill_(0.0 if beta is None else round_weight)

    def zero_grad(self) -> None:
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=True)

    def __call__(self) -> None:
        """Forward, backward and optimizer step for the batch at the device-side counter."""
        b = self.draws.index_select(0, self.counter).view(-1)
        self.counter += 1
        self.sim.index.set(self.io.groups[b], self.io.steps[b])
        args, kwargs = self.io.call_args(b)
        self.rec = reconstruction_loss(first_tensor(self.module(*args, **kwargs)), self.io.target[b])
        self.reg = sum((w.regulariser(self.beta) for w in self.weights), torch.zeros((), device=self.rec.device))
        (self.rec + self.reg_weight * self.reg).backward()
        for opt in self.optimizers:
            opt.step()


def _capture(stepper: _Stepper, warm: int, prepare) -> "torch.cuda.CUDAGraph":
    """Run steps 0 … warm−1 (real steps) on a side stream, as graph capture requires, then capture one step."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for it in range(warm):
            prepare(it)
            stepper.zero_grad()
            stepper()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    stepper.zero_grad()  # the captured backward allocates the gradients from the graph's pool
    with torch.cuda.graph(graph):
        stepper()
    return graph


def optimize_block(sim: QuantSim, block: Block, io: BlockIO, cfg: MethodConfig, iters: int, progress: bool,
                   learn_rounding: bool = True) -> dict:
    """Learn the block's rounding (unless `learn_rounding` is off: the current rounding stays, hard) and
    step sizes; leaves the block quantized with hard rounding."""
    layers = [sim.layers[n] for n in block.layers]
    weights = [l.weight_q for l in layers if isinstance(l, FakeQuantLayer)] if learn_rounding else []
    act_quantizers = [qz for l in layers for qz in l.quantizers().values()]
    for qz in act_quantizers:
        qz.learn_log2_scale = cfg.learn_log2_scale
    learnable = ("uniform", "log2") if cfg.learn_log2_scale else ("uniform",)
    scales = [qz.log_scale for qz in act_quantizers if cfg.learn_act_scale and any(k in qz.kinds for k in learnable)]
    if not weights and not scales:  # rounding kept and no step size to learn: nothing to optimise
        sim.set_mode(block.layers, weight="quant", act=True)
        return {"final_rec_loss": None, "final_round_loss": None, "cuda_graph": False}
    sim.set_mode(block.layers, weight="soft" if learn_rounding else "quant", act=True)
    for w in weights:
        w.alpha.requires_grad_(True)
        w.learned = True
    for s in scales:
        s.requires_grad_(True)
    graphed = _use_cuda_graph(cfg, io.groups.device)
    opt_w = _adam([w.alpha for w in weights], cfg.weight_lr, graphed)
    opt_a = _adam(scales, cfg.act_lr, graphed)
    stepper = _Stepper(sim, block, io, cfg, iters, weights, [o for o in (opt_w, opt_a) if o is not None])

    def prepare(it: int) -> None:
        """Regulariser schedule and LSQ learning rate of step `it`."""
        stepper.set_schedule(beta_schedule(it, iters, cfg.warmup, cfg.beta_start, cfg.beta_end), cfg.round_weight)
        _set_lr(opt_a, cosine_lr(cfg.act_lr, it, iters))

    # capture only when steps remain after the warm-up; otherwise every step runs eagerly below
    warm = CUDA_GRAPH_WARMUP if graphed and iters > CUDA_GRAPH_WARMUP else 0
    try:
        graph = _capture(stepper, warm, prepare) if warm else None
        for it in tqdm(range(warm, iters), initial=warm, total=iters, desc=f"reconstruct {block.name}",
                       disable=not progress, leave=False):
            prepare(it)
            if graph is not None:
                graph.replay()
            else:
                stepper.zero_grad()
                stepper()
    finally:
        for w in weights:
            w.alpha.requires_grad_(False)
        for s in scales:
            s.requires_grad_(False)
        sim.set_mode(block.layers, weight="quant", act=True)
    rec = float(stepper.rec.detach()) if stepper.rec is not None else 0.0
    reg = float((stepper.reg_weight * stepper.reg).detach()) if stepper.reg is not None else 0.0
    return {"final_rec_loss": rec, "final_round_loss": reg, "cuda_graph": graph is not None if iters else False}


def reconstruct_round(
    sim: QuantSim,
    float_unet: torch.nn.Module,
    blocks: list[Block],
    points: CalibPoints,
    cfg: MethodConfig,
    iters: int,
    initialize: bool,
    num_steps: int,
    desc: str,
    learn_rounding: bool = True,
) -> dict:
    """One pass over all blocks (initialise when asked, then reconstruct); returns per-block records."""
    groups = sim.index.groups_of(points.timesteps)
    if not cfg.reconstruct:  # initialisation only: the init subset is all that is needed
        keep = init_point_indices(len(points), cfg.init_points, points.x.device)
        points = points.take(keep)
        groups = groups[keep]
    input_model = sim.model if cfg.block_inputs == "quantized" else float_unet
    with torch.no_grad():
        targets = capture_targets(float_unet, blocks, points, cfg.batch_size, cfg.cache_device, cfg.progress)
    records: dict = {"blocks": {}, "daq": {}, "tcr": {}}
    for block in tqdm(blocks, desc=desc, disable=not cfg.progress):
        io = block_io(block, input_model, points, groups, targets.pop(block.name).to(points.x.device), cfg.batch_size)
        entry = {}
        if initialize:
            decisions = initialize_block(sim, block, io, cfg, num_steps)
            records["daq"].update(decisions["daq"])
            records["tcr"].update(decisions["tcr"])
        if cfg.reconstruct and iters > 0:
            sim.set_mode(block.layers, weight="quant", act=True)
            entry["loss_before"] = block_error(sim, block, io, cfg.batch_size)
            entry.update(optimize_block(sim, block, io, cfg, iters, cfg.progress, learn_rounding))
            entry["loss_after"] = block_error(sim, block, io, cfg.batch_size)
        sim.set_mode(block.layers, weight="quant", act=True)
        records["blocks"][block.name] = {k: _round(v) if isinstance(v, float) else v for k, v in entry.items()}
        del io
    return records


def _round(v: float) -> float:
    return float(f"{v:.6g}") if math.isfinite(v) else v
