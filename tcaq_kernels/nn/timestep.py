"""The device-side timestep → group index that every quantized layer reads its parameters with."""
from __future__ import annotations

import copy
import weakref
from typing import Sequence

import torch


class TimestepGroups(torch.nn.Module):
    """Holds the group edges and the current per-sample group index, both on the model's device.

    `update` is called once per UNet forward (by a pre-hook that `convert` installs). It only
    launches device work — a bucketize and an in-place copy — so a sampling loop never waits on the
    host. The `group` buffer of each batch size is allocated once and kept, so its address never
    changes: a CUDA graph captured at one batch size keeps reading (and its captured `update` keeps
    writing) live memory after calls at other sizes.

    The layers read the index through `current`. A deep copy of a part of the converted model (say
    `copy.deepcopy(unet.up_blocks[0])`) takes its own copy of this module, which no UNet forward updates:
    `current` then refuses, naming the layer, until `update` is called on it — instead of every layer
    silently keeping the group of the moment it was copied. A copy of the whole model (or of anything
    holding it) stays attached to its copy.
    """

    def __init__(self, edges: Sequence[float]):
        super().__init__()
        self.register_buffer("edges", torch.tensor(list(edges), dtype=torch.float32), persistent=False)
        self.register_buffer("group", torch.zeros(1, dtype=torch.int32), persistent=False)
        self._by_batch: dict[tuple[int, torch.device], torch.Tensor] = {}
        self._owner = None  # weakref to the model whose forward pre-hook calls `update` (`attach`)
        self._detached = False

    def attach(self, owner: torch.nn.Module) -> None:
        """Record the model whose forward updates the index (`convert` installs its pre-hook)."""
        self._owner = weakref.ref(owner)

    def __deepcopy__(self, memo):
        new = self.__class__.__new__(self.__class__)
        memo[id(self)] = new
        for key, value in self.__dict__.items():
            new.__dict__[key] = copy.deepcopy(value, memo)
        owner = self._owner() if self._owner is not None else None
        if owner is not None:  # the owner is in `memo` when the copy started at it or above it
            copied = memo.get(id(owner))
            new._owner = weakref.ref(copied) if copied is not None else None
            new._detached = copied is None
        return new

    def __getstate__(self):
        """Pickled without the owner's weak reference, which the owner's pre-hook sets again on its first
        forward (`_detached` travels as it is)."""
        return {**self.__dict__, "_owner": None}

    def current(self, layer: str) -> torch.Tensor:
        """The per-sample group index [batch] for `layer`'s lookups."""
        if self._detached:
            raise RuntimeError(
                f"layer '{layer}': deep-copied apart from the converted UNet, whose forward sets the timestep "
                "group; call `.groups.update(timestep, batch_size)` on a quantized layer of the copy (its layers "
                "share one) before running it, or copy the whole converted model")
        return self.group

    @property
    def num_groups(self) -> int:
        return self.edges.numel() + 1

    def update(self, timestep, batch: int) -> None:
        """Set `group` [batch] from a scalar or per-sample `timestep` (int, float or tensor)."""
        self._detached = False
        t = torch.as_tensor(timestep)
        if t.device != self.edges.device and self.edges.is_cuda:
            t = t.pin_memory()  # a pinned, non-blocking copy does not wait for queued GPU work
        t = t.to(device=self.edges.device, dtype=torch.float32, non_blocking=True).reshape(-1)
        g = torch.bucketize(t, self.edges, right=True, out_int32=True)
        if g.numel() == 1:
            g = g.expand(batch)
        elif g.numel() != batch:
            raise ValueError(f"timestep has {g.numel()} entries but the batch has {batch} samples")
        if self.group.shape != g.shape:
            self._by_batch.setdefault((self.group.numel(), self.group.device), self.group)  # keep it alive
            key = (g.numel(), g.device)
            if key not in self._by_batch:
                self._by_batch[key] = torch.empty_like(g)
            self.group = self._by_batch[key]
        self.group.copy_(g)


def set_groups_hook(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
    """UNet forward pre-hook: read `sample` and `timestep` however they were passed."""
    sample = args[0] if args else kwargs["sample"]
    timestep = args[1] if len(args) > 1 else kwargs["timestep"]
    groups = module.tcaq_groups
    if groups._owner is None:  # unpickled: the weak reference did not travel
        groups.attach(module)
    groups.update(timestep, sample.shape[0])


def per_sample(table: torch.Tensor, group: torch.Tensor, like: torch.Tensor, layer: str) -> torch.Tensor:
    """`table[group]` shaped [B, 1, …, 1] to broadcast against `like` (batch first)."""
    values = table[group]
    if like.shape[0] != values.shape[0]:
        if values.shape[0] != 1:
            raise ValueError(
                f"layer '{layer}': input batch {like.shape[0]} differs from the UNet batch {values.shape[0]}"
            )
    return values.view(values.shape[0], *([1] * (like.dim() - 1)))
