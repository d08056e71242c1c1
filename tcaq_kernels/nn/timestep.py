"""The device-side timestep → group index that every quantized layer reads its parameters with."""
from __future__ import annotations

from typing import Sequence

import torch


class TimestepGroups(torch.nn.Module):
    """Holds the group edges and the current per-sample group index, both on the model's device.

    `update` is called once per UNet forward (by a pre-hook that `convert` installs). It only
    launches device work — a bucketize and an in-place copy — so a sampling loop never waits on the
    host. The `group` buffer of each batch size is allocated once and kept, so its address never
    changes: a CUDA graph captured at one batch size keeps reading (and its captured `update` keeps
    writing) live memory after calls at other sizes.
    """

    def __init__(self, edges: Sequence[float]):
        super().__init__()
        self.register_buffer("edges", torch.tensor(list(edges), dtype=torch.float32), persistent=False)
        self.register_buffer("group", torch.zeros(1, dtype=torch.int32), persistent=False)
        self._by_batch: dict[tuple[int, torch.device], torch.Tensor] = {}

    @property
    def num_groups(self) -> int:
        return self.edges.numel() + 1

    def update(self, timestep, batch: int) -> None:
        """Set `group` [batch] from a scalar or per-sample `timestep` (int, float or tensor)."""
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
    module.tcaq_groups.update(timestep, sample.shape[0])


def per_sample(table: torch.Tensor, group: torch.Tensor, like: torch.Tensor, layer: str) -> torch.Tensor:
    """`table[group]` shaped [B, 1, …, 1] to broadcast against `like` (batch first)."""
    values = table[group]
    if like.shape[0] != values.shape[0]:
        if values.shape[0] != 1:
            raise ValueError(
                f"layer '{layer}': input batch {like.shape[0]} differs from the UNet batch {values.shape[0]}"
            )
    return values.view(values.shape[0], *([1] * (like.dim() - 1)))
