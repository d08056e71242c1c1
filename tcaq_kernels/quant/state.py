"""`CalibState`: everything a calibration decided, in a versioned, validated, portable file.

A state holds integers and scales only; the float model it was calibrated on supplies the rest
(biases, norms, float-kept layers). The file is one safetensors file whose metadata carries the
JSON manifest and a SHA-256 of all tensor bytes, so a truncated or altered file is refused at load.

Versions: 2 added split inputs (below); 3 added `p_row_norm` on attention layers (the post-softmax
map divided by its quantized row mass, quant/primitives.py `attention_row_scale`); 4 added `p_row_max`
on attention layers (the map quantized is exp(S − row max), normalised by its float row sum after
P·V, quant/primitives.py `row_max_exp`). An older file is a version-4 file without split layers / row
normalisation / row-max maps, so it loads as one (and is written back as version 4); a reader of an
older version refuses a newer file rather than compute its attention wrongly.

Split inputs (Q-Diffusion's shortcut splitting): a conv2d/linear layer whose input is a
concatenation `cat([h, skip], channel dim)` may carry `input_split` = the first channel of the
second range. Channels `[0, split)` are quantized by the activation quantizer `"input"`, channels
`[split, C_in)` by `"input_skip"` (same bits, own scale and zero point per timestep group), and the
layer computes (ops/reference.py states the exact evaluation order)

    y = (acc1·(s_w[n]·s_a1[g]) + acc2·(s_w[n]·s_a2[g])) + bias,
    acc_i = Σ_{k ∈ range i} w_int[n, k]·(a_int[k] − z_i[g])          (int32, each range on its own)

with conv zero padding of each range at its own zero point z_i (so each correction term is
`z_i·Σ_{k ∈ range i} w_int`). The TCR factor r of every input channel applies in both ranges.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
from safetensors import safe_open
from safetensors.torch import save as serialize

from ..atomic import atomic_write_bytes
from .primitives import ACT_BITS, WEIGHT_BITS, qrange, unpack_int4

STATE_VERSION = 4
READABLE_VERSIONS = (1, 2, 3, 4)
_META_KEY = "tcaq_calib_state"
_DIGEST_KEY = "tcaq_sha256"
ACT_KINDS = ("uniform", "log2")
# Activation quantizers of each layer kind. Attention: q, k, v feed the two integer products
# (symmetric, zero point 0); p is the post-softmax map, whose quantizer DAQ may switch per group.
LAYER_ACTS = {"conv2d": ("input",), "linear": ("input",), "attention": ("q", "k", "v", "p")}
SYMMETRIC_ACTS = {"q", "k", "v"}
SKIP_ACT = "input_skip"  # the quantizer of the second channel range of a split input


def layer_acts(kind: str, input_split: Optional[int] = None) -> tuple[str, ...]:
    """Activation quantizer names of a layer: LAYER_ACTS, plus "input_skip" when its input is split."""
    return LAYER_ACTS[kind] + ((SKIP_ACT,) if input_split is not None else ())


def input_ranges(input_split: Optional[int], c_in: int) -> list[tuple[str, int, int]]:
    """`(quantizer name, first channel, end channel)` of each input channel range of a layer."""
    if input_split is None:
        return [("input", 0, c_in)]
    return [("input", 0, input_split), (SKIP_ACT, input_split, c_in)]


class CalibStateError(ValueError):
    """A CalibState that cannot be used; the message names the file, layer and field at fault."""


@dataclass
class ActQuant:
    """Per-timestep-group parameters of one activation quantizer (G groups)."""

    bits: int
    kind: list[str]  # per group: "uniform" | "log2"
    scale: torch.Tensor  # [G] float32
    zero: torch.Tensor  # [G] int32 (signed codes; unused by log2 groups)

    @property
    def kind_ids(self) -> torch.Tensor:
        return torch.tensor([ACT_KINDS.index(k) for k in self.kind], dtype=torch.int32)


@dataclass
class LayerState:
    """One quantized layer: a Conv2d/Linear (weights + input quantizer) or an Attention block."""

    kind: str  # "conv2d" | "linear" | "attention"
    acts: dict[str, ActQuant]
    w_bits: Optional[int] = None
    weight: Optional[torch.Tensor] = None  # int8 [N, K], or uint8 [N, ceil(K/2)] when w_bits == 4
    weight_shape: Optional[tuple[int, ...]] = None  # the float module's weight shape
    weight_scale: Optional[torch.Tensor] = None  # [N] float32
    tcr: Optional[torch.Tensor] = None  # [C_in] float32 TCR factors r (None: TCR off)
    input_split: Optional[int] = None  # first input channel quantized by "input_skip" (None: not split)
    p_row_norm: bool = False  # attention: P·V divided by each row's quantized P mass (version 3)
    p_row_max: bool = False  # attention: the map quantized is exp(S − row max), P·V ÷ its row sum (version 4)

    def weight_int(self) -> torch.Tensor:
        """Integer weights as int8 in the float module's weight shape (unpacking 4-bit)."""
        return stored_weight_codes(self.weight, self.w_bits, self.weight_shape)


def stored_weight_codes(stored: torch.Tensor, w_bits: int, shape) -> torch.Tensor:
    """int8 codes shaped like the float weight, from the stored [N, K] (or packed 4-bit) tensor."""
    shape = tuple(shape)
    w = unpack_int4(stored, math.prod(shape[1:])) if w_bits == 4 else stored
    return w.reshape(shape)


@dataclass
class CalibState:
    """A calibrated quantization of one model: see DESIGN.md §3 for how each field is used."""

    method: str
    bits: str
    group_edges: list[float]  # sorted timesteps; group g = number of edges ≤ t
    model_fingerprint: str
    layers: dict[str, LayerState]
    float_layers: list[str] = field(default_factory=list)
    settings: dict[str, Any] = field(default_factory=dict)
    model_class: str = ""
    version: int = STATE_VERSION

    @property
    def num_groups(self) -> int:
        return len(self.group_edges) + 1

    # ------------------------------------------------------------------------------------ IO

    def save(self, path: str | os.PathLike) -> Path:
        """Write atomically (temp file in the same folder, fsync, rename): never a half-written state."""
        tensors, manifest = self._flatten()
        metadata = {_META_KEY: json.dumps(manifest, sort_keys=True), _DIGEST_KEY: _digest(tensors)}
        return atomic_write_bytes(path, serialize(tensors, metadata=metadata))

    @classmethod
    def load(cls, path: str | os.PathLike) -> "CalibState":
        """Read and integrity-check a state file; errors name the file and what is wrong."""
        path = Path(path)
        if not path.is_file():
            raise CalibStateError(f"{path}: no such CalibState file")
        try:
            with safe_open(str(path), framework="pt") as fh:
                metadata = fh.metadata() or {}
                tensors = {k: fh.get_tensor(k) for k in fh.keys()}
        except Exception as exc:  # safetensors raises its own error types for bad headers/lengths
            raise CalibStateError(f"{path}: truncated or corrupted CalibState ({exc})") from exc
        if _META_KEY not in metadata or _DIGEST_KEY not in metadata:
            raise CalibStateError(f"{path}: not a tcaq CalibState (no '{_META_KEY}' metadata)")
        if _digest(tensors) != metadata[_DIGEST_KEY]:
            raise CalibStateError(f"{path}: corrupted CalibState (tensor checksum mismatch)")
        try:
            manifest = json.loads(metadata[_META_KEY])
        except json.JSONDecodeError as exc:
            raise CalibStateError(f"{path}: corrupted CalibState manifest ({exc})") from exc
        version = manifest.get("version")
        if version not in READABLE_VERSIONS:
            raise CalibStateError(
                f"{path}: unknown CalibState version {version!r} (this tcaq_kernels reads versions {READABLE_VERSIONS})"
            )
        try:
            return cls._unflatten(manifest, tensors)
        except KeyError as exc:
            raise CalibStateError(f"{path}: CalibState is missing tensor or field {exc}") from exc

    def tensor_digest(self) -> str:
        """sha256 of the state's tensors alone (the checksum `save` stores). Two calibrations that decided the
        same thing share it even where their files differ: the manifest records each run's wall times."""
        return _digest(self._flatten()[0])

    def _flatten(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        tensors: dict[str, torch.Tensor] = {}
        layers: dict[str, Any] = {}
        for name, layer in self.layers.items():
            entry: dict[str, Any] = {"kind": layer.kind, "acts": {}}
            for act_name, act in layer.acts.items():
                entry["acts"][act_name] = {"bits": act.bits, "kind": list(act.kind)}
                tensors[f"{name}::{act_name}.scale"] = act.scale.detach().float().cpu().contiguous()
                tensors[f"{name}::{act_name}.zero"] = act.zero.detach().to(torch.int32).cpu().contiguous()
            if layer.p_row_norm:
                entry["p_row_norm"] = True
            if layer.p_row_max:
                entry["p_row_max"] = True
            if layer.kind != "attention":
                entry.update(w_bits=layer.w_bits, weight_shape=list(layer.weight_shape), tcr=layer.tcr is not None)
                tensors[f"{name}::weight"] = layer.weight.detach().cpu().contiguous()
                tensors[f"{name}::weight_scale"] = layer.weight_scale.detach().float().cpu().contiguous()
                if layer.tcr is not None:
                    tensors[f"{name}::tcr"] = layer.tcr.detach().float().cpu().contiguous()
                if layer.input_split is not None:
                    entry["input_split"] = layer.input_split
            layers[name] = entry
        manifest = {
            "version": self.version,
            "method": self.method,
            "bits": self.bits,
            "group_edges": list(self.group_edges),
            "model_fingerprint": self.model_fingerprint,
            "model_class": self.model_class,
            "float_layers": list(self.float_layers),
            "settings": self.settings,
            "layers": layers,
        }
        return tensors, manifest

    @classmethod
    def _unflatten(cls, manifest: dict[str, Any], tensors: dict[str, torch.Tensor]) -> "CalibState":
        layers = {}
        for name, entry in manifest["layers"].items():
            acts = {
                a: ActQuant(
                    bits=int(spec["bits"]),
                    kind=list(spec["kind"]),
                    scale=tensors[f"{name}::{a}.scale"],
                    zero=tensors[f"{name}::{a}.zero"],
                )
                for a, spec in entry["acts"].items()
            }
            layer = LayerState(kind=entry["kind"], acts=acts, p_row_norm=bool(entry.get("p_row_norm", False)),
                               p_row_max=bool(entry.get("p_row_max", False)))
            if entry["kind"] != "attention":
                layer.w_bits = int(entry["w_bits"])
                layer.weight_shape = tuple(entry["weight_shape"])
                layer.weight = tensors[f"{name}::weight"]
                layer.weight_scale = tensors[f"{name}::weight_scale"]
                layer.tcr = tensors[f"{name}::tcr"] if entry.get("tcr") else None
                layer.input_split = entry.get("input_split")
            layers[name] = layer
        return cls(
            method=manifest["method"],
            bits=manifest["bits"],
            group_edges=list(manifest["group_edges"]),
            model_fingerprint=manifest["model_fingerprint"],
            layers=layers,
            float_layers=list(manifest["float_layers"]),
            settings=dict(manifest.get("settings", {})),
            model_class=manifest.get("model_class", ""),
        )

    # ------------------------------------------------------------------------------ validate

    def validate(self, model: torch.nn.Module) -> None:
        """Check this state against `model`; raise `CalibStateError` naming the first bad layer."""
        from .layers import quantizable_layers, model_fingerprint  # local: avoids an import cycle

        if self.version != STATE_VERSION:
            raise CalibStateError(f"unknown CalibState version {self.version!r} (expected {STATE_VERSION})")
        edges = torch.tensor(self.group_edges, dtype=torch.float64)
        if edges.numel() and not (torch.isfinite(edges).all() and (edges[1:] > edges[:-1]).all()):
            raise CalibStateError(f"group_edges must be finite and strictly increasing, got {self.group_edges}")
        fingerprint = model_fingerprint(model)
        if fingerprint != self.model_fingerprint:
            raise CalibStateError(
                f"model fingerprint {fingerprint} does not match the state's {self.model_fingerprint}: "
                "the state was calibrated on a different architecture"
            )
        modules = dict(model.named_modules())
        for name in self.float_layers:
            if name not in modules:
                raise CalibStateError(f"float-kept layer '{name}' does not exist in the model")
        expected = {n: k for n, k in quantizable_layers(model).items() if n not in set(self.float_layers)}
        missing = sorted(set(expected) - set(self.layers))
        if missing:
            raise CalibStateError(f"layer '{missing[0]}' is in the model but missing from the state ({len(missing)} missing)")
        extra = sorted(set(self.layers) - set(expected))
        if extra:
            raise CalibStateError(f"layer '{extra[0]}' is in the state but not a quantizable layer of the model")
        for name, layer in self.layers.items():
            _validate_layer(name, layer, expected[name], modules[name], self.num_groups)


def _validate_layer(name: str, layer: LayerState, kind: str, module: torch.nn.Module, groups: int) -> None:
    def fail(msg: str) -> None:
        raise CalibStateError(f"layer '{name}': {msg}")

    if layer.kind != kind:
        fail(f"kind '{layer.kind}' but the model has a {kind}")
    if layer.p_row_norm and kind != "attention":
        fail("p_row_norm is for attention layers (it normalises the post-softmax map)")
    if layer.p_row_max and kind != "attention":
        fail("p_row_max is for attention layers (it changes what the post-softmax map is)")
    if layer.input_split is not None and kind == "attention":
        fail("input_split is for conv2d/linear inputs; attention layers have no split input")
    if SKIP_ACT in layer.acts and layer.input_split is None:
        fail(f"has an '{SKIP_ACT}' activation quantizer but no input_split")
    expected_acts = layer_acts(kind, layer.input_split)
    if set(layer.acts) != set(expected_acts):
        fail(f"activation quantizers {sorted(layer.acts)}, expected {sorted(expected_acts)}")
    for act_name, act in layer.acts.items():
        where = f"activation '{act_name}'"
        if act.bits not in ACT_BITS:
            fail(f"{where} bits {act.bits} not in {ACT_BITS}")
        if len(act.kind) != groups or act.scale.shape != (groups,) or act.zero.shape != (groups,):
            fail(f"{where} has {len(act.kind)} kinds / scale {tuple(act.scale.shape)} / zero {tuple(act.zero.shape)}, expected {groups} timestep groups")
        bad_kinds = set(act.kind) - set(ACT_KINDS)
        if bad_kinds:
            fail(f"{where} unknown quantizer kind {sorted(bad_kinds)}")
        if "log2" in act.kind and act_name != "p":
            fail(f"{where}: log2 quantizers are only for post-softmax maps ('p')")
        _check_scale(fail, f"{where} scale", act.scale)
        qmin, qmax = qrange(act.bits)
        if act.zero.dtype not in (torch.int32, torch.int64) or (act.zero < qmin).any() or (act.zero > qmax).any():
            fail(f"{where} zero points must be integers in [{qmin}, {qmax}]")
        if act_name in SYMMETRIC_ACTS and (act.zero != 0).any():
            fail(f"{where} must be symmetric (zero point 0)")
    if kind == "attention":
        return
    if layer.w_bits not in WEIGHT_BITS:
        fail(f"weight bits {layer.w_bits} not in {WEIGHT_BITS}")
    if tuple(layer.weight_shape) != tuple(module.weight.shape):
        fail(f"weight shape {tuple(layer.weight_shape)} does not match the model's {tuple(module.weight.shape)}")
    n, k = layer.weight_shape[0], math.prod(layer.weight_shape[1:])
    stored = (n, (k + 1) // 2) if layer.w_bits == 4 else (n, k)
    want_dtype = torch.uint8 if layer.w_bits == 4 else torch.int8
    if layer.weight.dtype != want_dtype or tuple(layer.weight.shape) != stored:
        fail(f"stored weight {layer.weight.dtype} {tuple(layer.weight.shape)}, expected {want_dtype} {stored}")
    qmin, qmax = qrange(layer.w_bits)
    w = layer.weight_int()
    if (w < qmin).any() or (w > qmax).any():
        fail(f"integer weights outside the {layer.w_bits}-bit range [{qmin}, {qmax}]")
    if layer.weight_scale.shape != (n,):
        fail(f"weight_scale shape {tuple(layer.weight_scale.shape)}, expected ({n},)")
    _check_scale(fail, "weight_scale", layer.weight_scale)
    c_in = layer.weight_shape[1]
    if layer.input_split is not None:
        _validate_split(fail, layer, c_in)
    if layer.tcr is not None:
        if layer.tcr.shape != (c_in,):
            fail(f"tcr shape {tuple(layer.tcr.shape)}, expected ({c_in},)")
        _check_scale(fail, "tcr", layer.tcr)


def _validate_split(fail, layer: LayerState, c_in: int) -> None:
    """A split input: an integer channel strictly inside the input, both ranges at the same bits."""
    split = layer.input_split
    if isinstance(split, bool) or not isinstance(split, int):
        fail(f"input_split must be an integer channel index, got {split!r}")
    if not 0 < split < c_in:
        fail(f"input_split {split} must lie strictly inside the {c_in} input channels (0 < split < {c_in})")
    bits = {a: layer.acts[a].bits for a in ("input", SKIP_ACT)}
    if bits["input"] != bits[SKIP_ACT]:
        fail(f"both ranges of a split input must have the same bits, got input {bits['input']} and "
             f"{SKIP_ACT} {bits[SKIP_ACT]}")


def _check_scale(fail, what: str, t: torch.Tensor) -> None:
    if not torch.isfinite(t).all():
        fail(f"{what} has {int((~torch.isfinite(t)).sum())} NaN/inf values")
    if (t <= 0).any():
        fail(f"{what} has {int((t <= 0).sum())} non-positive values")


def _digest(tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()

