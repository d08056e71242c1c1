"""Reconstruction blocks of a UNet and the capture of their inputs and full-precision outputs.

A block is the unit BRECQ reconstructs jointly: an outermost module of one of `BLOCK_TYPES` that
holds quantized layers (in a diffusers UNet: ResBlocks, attention blocks, down/up samplers, the
timestep-embedding MLP). A quantized layer inside no such module is a block of its own. Blocks are
ordered as the forward pass first runs them, because a block's quantized inputs depend on every
block before it.

Targets (full-precision block outputs) are captured for all blocks in one pass; inputs are captured
per block, stopping the forward (an exception from the hook) as soon as the block is reached, since
each block's quantized inputs depend on the blocks calibrated before it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch
from tqdm.auto import tqdm

from .data import CalibPoints

BLOCK_TYPES = (
    "ResnetBlock2D",
    "ResnetBlockCondNorm2D",
    "Attention",
    "Downsample2D",
    "Upsample2D",
    "TimestepEmbedding",
    "BasicTransformerBlock",
)


@dataclass
class Block:
    name: str  # module name of the block
    layers: list[str]  # quantized layers inside it (an attention layer included), in module order


def find_blocks(unet: torch.nn.Module, layers: dict[str, str], example: tuple[torch.Tensor, Any],
                example_kwargs: Optional[dict] = None) -> list[Block]:
    """Blocks covering every quantized layer, in execution order (one forward of `example`, with
    `example_kwargs`: a text-conditional UNet's encoder_hidden_states)."""
    modules = dict(unet.named_modules())
    candidates = [n for n, m in modules.items() if n and type(m).__name__ in BLOCK_TYPES]
    outer = [n for n in candidates if not any(n.startswith(o + ".") for o in candidates if o != n)]
    inside = {n: [l for l in layers if l == n or l.startswith(n + ".")] for n in outer}
    blocks = {n: ls for n, ls in inside.items() if ls}
    covered = {l for ls in blocks.values() for l in ls}
    for name in layers:
        if name not in covered:
            blocks[name] = [name]
    order: list[str] = []
    handles = [
        modules[n].register_forward_pre_hook(lambda m, a, _n=n: None if _n in order else order.append(_n))
        for n in blocks
    ]
    try:
        with torch.no_grad():
            unet(*example, **(example_kwargs or {}))
    finally:
        for h in handles:
            h.remove()
    never = sorted(set(blocks) - set(order))
    if never:
        raise ValueError(f"block '{never[0]}' holds quantized layers but never runs in the forward pass; add its layers to keep_float")
    return [Block(n, blocks[n]) for n in order]


class _Stop(Exception):
    """Raised by a capture hook once it has what it needs, to skip the rest of the forward."""


@dataclass
class BlockIO:
    """A block's captured call arguments (per-point tensors batched on dim 0) and its targets."""

    args: list[Any]
    kwargs: dict[str, Any]
    batched: set  # positions / names of per-point tensors
    target: torch.Tensor  # [P, ...] full-precision block outputs
    groups: torch.Tensor  # [P] timestep group of each point
    steps: torch.Tensor  # [P] sampler step of each point

    def __len__(self) -> int:
        return self.groups.shape[0]

    def call_args(self, idx: torch.Tensor) -> tuple[list[Any], dict[str, Any]]:
        args = [a[idx] if i in self.batched else a for i, a in enumerate(self.args)]
        kwargs = {k: v[idx] if k in self.batched else v for k, v in self.kwargs.items()}
        return args, kwargs


def first_tensor(out):
    """A block's output tensor (the first element when a block returns a tuple)."""
    return out[0] if isinstance(out, (tuple, list)) else out


class _InputRecorder:
    """Collects one block's call arguments over the capture batches, stopping each forward there."""

    def __init__(self):
        self.args: list[list[Any]] = []
        self.kwargs: list[dict[str, Any]] = []

    def __call__(self, module, args, kwargs):
        self.args.append([a.detach() if torch.is_tensor(a) else a for a in args])
        self.kwargs.append({k: v.detach() if torch.is_tensor(v) else v for k, v in kwargs.items()})
        raise _Stop


def _merge_inputs(recorder: _InputRecorder, sizes: list[int], block: str) -> tuple[list[Any], dict[str, Any], set]:
    """Concatenate per-point tensors over batches; anything else must be the same in every batch."""

    def merge(key, values):
        first = values[0]
        if torch.is_tensor(first) and first.dim() > 0 and all(v.shape[0] == n for v, n in zip(values, sizes)):
            return torch.cat(values), True
        for v in values[1:]:
            same = torch.equal(v, first) if torch.is_tensor(first) and torch.is_tensor(v) and v.shape == first.shape else v is first or v == first
            if not same:
                raise ValueError(f"block '{block}': argument {key!r} changes between capture batches but is not per-sample")
        return first, False

    args, batched = [], set()
    for i in range(len(recorder.args[0])):
        value, per_point = merge(i, [a[i] for a in recorder.args])
        args.append(value)
        if per_point:
            batched.add(i)
    kwargs = {}
    for k in recorder.kwargs[0]:
        value, per_point = merge(k, [kw[k] for kw in recorder.kwargs])
        kwargs[k] = value
        if per_point:
            batched.add(k)
    return args, kwargs, batched


@torch.no_grad()
def capture_targets(model: torch.nn.Module, blocks: list[Block], points: CalibPoints, batch_size: int,
                    cache_device=None, progress: bool = False) -> dict[str, torch.Tensor]:
    """Every block's output in one full forward pass per batch: {block: [P, …] float32 on cache_device}.

    One pass instead of one per block; the price is memory, P × the sum of all block outputs
    (3.6 MB a point for the reference model).
    """
    outputs: dict[str, list[torch.Tensor]] = {b.name: [] for b in blocks}
    handles = [
        model.get_submodule(b.name).register_forward_hook(
            lambda m, a, out, _n=b.name: outputs[_n].append(first_tensor(out).detach().float().to(cache_device)))
        for b in blocks
    ]
    try:
        for x, t, _, kwargs in tqdm(points.batches(batch_size), desc="full-precision targets", disable=not progress,
                                    leave=False):
            model(x, t, **kwargs)
    finally:
        for h in handles:
            h.remove()
    calls = {n: len(v) for n, v in outputs.items()}
    expected = -(-len(points) // batch_size)
    wrong = [n for n, c in calls.items() if c != expected]
    if wrong:
        raise ValueError(f"block '{wrong[0]}' ran {calls[wrong[0]]} times in {expected} forward passes; "
                         "a block called more than once per forward cannot be reconstructed as one block")
    return {n: torch.cat(v) for n, v in outputs.items()}


@torch.no_grad()
def capture_inputs(block: Block, model: torch.nn.Module, points: CalibPoints, batch_size: int) -> tuple[list, dict, set]:
    """`block`'s call arguments as `model` gives them; each forward stops at the block."""
    recorder = _InputRecorder()
    handle = model.get_submodule(block.name).register_forward_pre_hook(recorder, with_kwargs=True)
    sizes = []
    try:
        for x, t, _, kwargs in points.batches(batch_size):
            sizes.append(x.shape[0])
            try:
                model(x, t, **kwargs)
            except _Stop:
                continue
            raise RuntimeError(f"block '{block.name}' did not run during the capture forward pass")
    finally:
        handle.remove()
    return _merge_inputs(recorder, sizes, block.name)


def block_io(block: Block, model: torch.nn.Module, points: CalibPoints, groups: torch.Tensor, target: torch.Tensor,
             batch_size: int) -> BlockIO:
    """The block's captured inputs from `model` with its (already captured) full-precision targets."""
    args, kwargs, batched = capture_inputs(block, model, points, batch_size)
    return BlockIO(args=args, kwargs=kwargs, batched=batched, target=target, groups=groups, steps=points.steps)
