"""`cuda_graphed(unet)`: a converted UNet that replays its forward from CUDA graphs.

Why: a quantized UNet makes one Triton launch per layer, and run eagerly its time goes into the host's
launch path (~120–400 µs a layer; latency.md: W8A8 at 0.59× bf16 eager), while replayed from a CUDA
graph it is at bf16's graph speed. Diffusers pipelines call `unet(...)` eagerly once per step; this
wrapper keeps that interface and replays instead.

One graph per call signature — the shapes, dtypes and devices of the tensor arguments and the values of
the others (a sampling loop at one batch size uses one graph; classifier-free guidance doubles the
batch, which is one other signature). The first call of a signature runs the model eagerly (Triton
autotunes there), then captures; later calls copy their tensors into the graph's static inputs and
replay. The graphs share one memory pool. The timestep is a graph input like any tensor (a Python
number becomes a 0-d device tensor), so the converted model's device-side timestep-group lookup
replays with each call's timestep; CPU tensors (schedulers' timesteps) are moved to the device first.
Outputs are copied out of the graph's memory, so a later call does not overwrite what an earlier one
returned.

Calls that cannot be replayed run eagerly: CPU models, autograd (grad mode on with parameters that
require grad), and arguments other than tensors, numbers, strings, booleans and None (nested dicts
such as `added_cond_kwargs` are captured as long as their leaves are of those kinds).
"""
from __future__ import annotations

import warnings
from collections import OrderedDict
from typing import Any

import torch

_SCALARS = (int, float, bool, str, type(None))


class GraphedUNet(torch.nn.Module):
    """Wraps `unet`; attributes it does not define itself (`config`, `dtype`, `device`, …) are the
    UNet's. `max_graphs` bounds the signatures kept (least recently used dropped)."""

    def __init__(self, unet: torch.nn.Module, warmup: int = 2, max_graphs: int = 8):
        super().__init__()
        if warmup < 1:
            raise ValueError(f"warmup must be ≥ 1 (Triton autotunes in the first eager call), got {warmup}")
        if max_graphs < 1:
            raise ValueError(f"max_graphs must be ≥ 1, got {max_graphs}")
        self.unet = unet
        self.warmup, self.max_graphs = warmup, max_graphs
        self._graphs: OrderedDict[tuple, _Graph] = OrderedDict()
        self._pool = None
        self._warned_grad = False

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(super().__getattr__("unet"), name)

    @property
    def num_graphs(self) -> int:
        return len(self._graphs)

    def _apply(self, fn, *args, **kwargs):
        self._graphs.clear()  # captured addresses belong to the old tensors
        return super()._apply(fn, *args, **kwargs)

    def forward(self, *args, **kwargs):
        device = next(self.unet.parameters()).device
        if device.type != "cuda":
            return self.unet(*args, **kwargs)
        if torch.is_grad_enabled() and any(p.requires_grad for p in self.unet.parameters()):
            if not self._warned_grad:
                warnings.warn("cuda_graphed: grad mode is on and the UNet has parameters that require grad, so "
                              "this call runs eagerly; call it under torch.no_grad() (pipelines do) or "
                              "unet.requires_grad_(False) to replay CUDA graphs", stacklevel=2)
                self._warned_grad = True
            return self.unet(*args, **kwargs)
        args, kwargs = _device_inputs(args, kwargs, device)
        key = _signature((args, kwargs))
        if key is None:
            return self.unet(*args, **kwargs)
        graph = self._graphs.get(key)
        if graph is None:
            if self._pool is None:
                self._pool = torch.cuda.graph_pool_handle()
            graph = _Graph(self.unet, args, kwargs, self.warmup, self._pool)
            self._graphs[key] = graph
            while len(self._graphs) > self.max_graphs:
                self._graphs.popitem(last=False)
        self._graphs.move_to_end(key)
        return graph(args, kwargs)


def cuda_graphed(unet: torch.nn.Module, warmup: int = 2, max_graphs: int = 8) -> GraphedUNet:
    """`unet` (typically `tcaq_kernels.convert(..., backend="triton")`) replayed from CUDA graphs; see
    the module doc. Use it in a pipeline as `pipe.unet = cuda_graphed(pipe.unet)`."""
    return GraphedUNet(unet, warmup, max_graphs)


class _Graph:
    """One captured forward: static copies of its tensor inputs and the output it wrote."""

    def __init__(self, unet, args, kwargs, warmup: int, pool):
        self.inputs = _map_tensors((args, kwargs), lambda t: t.clone())
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # warm-up off the default stream, as capture wants
            for _ in range(warmup):
                unet(*self.inputs[0], **self.inputs[1])
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, pool=pool):
            self.output = unet(*self.inputs[0], **self.inputs[1])

    def __call__(self, args, kwargs):
        _copy_into(self.inputs, (args, kwargs))
        self.graph.replay()
        return _map_tensors(self.output, lambda t: t.clone())


def _device_inputs(args: tuple, kwargs: dict, device) -> tuple[tuple, dict]:
    """The call's arguments with every tensor on `device` and a Python-number timestep (second
    positional or `timestep=`) as a 0-d tensor there: a graph reads its inputs from device memory, and
    a value moved in during capture would be replayed as the capture's (schedulers hand out CPU
    timesteps). Pinned, non-blocking copies: the host does not wait for queued GPU work."""
    as_tensor = lambda t: torch.tensor(t) if isinstance(t, (int, float)) and not isinstance(t, bool) else t
    if len(args) > 1:
        args = (args[0], as_tensor(args[1]), *args[2:])
    elif "timestep" in kwargs:
        kwargs = {**kwargs, "timestep": as_tensor(kwargs["timestep"])}
    to_device = lambda t: t.pin_memory().to(device, non_blocking=True) if t.device.type == "cpu" else t
    return _map_tensors((args, kwargs), to_device)


def _signature(obj) -> tuple | None:
    """Hashable description of a call's arguments, or None where one cannot be captured."""
    if isinstance(obj, torch.Tensor):
        return ("tensor", tuple(obj.shape), obj.dtype, obj.device)
    if isinstance(obj, _SCALARS):
        return ("value", type(obj).__name__, obj)
    if isinstance(obj, (tuple, list)):
        items = [_signature(o) for o in obj]
        return None if None in items else (type(obj).__name__, *items)
    if isinstance(obj, dict):
        items = [(k, _signature(v)) for k, v in sorted(obj.items())]
        return None if any(v is None for _, v in items) else ("dict", *items)
    return None


def _map_tensors(obj, fn):
    """`obj` with every tensor leaf replaced by fn(leaf); keeps tuples, lists, dicts and diffusers'
    output dataclasses (dict subclasses built from keyword arguments)."""
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if isinstance(obj, (tuple, list)):
        return type(obj)(_map_tensors(o, fn) for o in obj)
    if isinstance(obj, dict):
        return type(obj)(**{k: _map_tensors(v, fn) for k, v in obj.items()})
    return obj


def _copy_into(static, new) -> None:
    if isinstance(static, torch.Tensor):
        static.copy_(new)
    elif isinstance(static, (tuple, list)):
        for s, n in zip(static, new):
            _copy_into(s, n)
    elif isinstance(static, dict):
        for k in static:
            _copy_into(static[k], new[k])
