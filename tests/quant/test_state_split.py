"""CalibState split inputs (version 2 on): they round-trip, version-1 files still load, bad splits are named."""
from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors.torch import save_file

from tcaq_kernels import CalibState, CalibStateError
from tcaq_kernels.quant import state as state_mod
from tcaq_kernels.quant.state import STATE_VERSION, ActQuant

LAYER = "up_blocks.0.resnets.0.conv1"  # reads cat([h, skip]): 128 + 128 channels


def _with_split(state, name=LAYER, split=128):
    s = copy.deepcopy(state)
    layer = s.layers[name]
    act = layer.acts["input"]
    layer.acts["input_skip"] = ActQuant(act.bits, list(act.kind), act.scale * 3, act.zero.clone())
    layer.input_split = split
    return s


def test_split_layer_round_trips(ref_state_w8a8, ref_unet, tmp_path):
    state = _with_split(ref_state_w8a8)
    state.validate(ref_unet)
    loaded = CalibState.load(state.save(tmp_path / "split.tcaq"))
    loaded.validate(ref_unet)
    assert loaded.version == STATE_VERSION == 4
    layer, other = state.layers[LAYER], loaded.layers[LAYER]
    assert other.input_split == 128 and set(other.acts) == {"input", "input_skip"}
    for act in ("input", "input_skip"):
        assert torch.equal(layer.acts[act].scale, other.acts[act].scale)
        assert torch.equal(layer.acts[act].zero, other.acts[act].zero)
    assert all(l.input_split is None for n, l in loaded.layers.items() if n != LAYER)


def _write_v1_by_hand(state, path):
    """A version-1 file as the version-1 writer laid it out: the same tensor names, a manifest without
    `input_split`, version 1."""
    tensors, layers = {}, {}
    for name, layer in state.layers.items():
        entry = {"kind": layer.kind, "acts": {}}
        for act, q in layer.acts.items():
            entry["acts"][act] = {"bits": q.bits, "kind": list(q.kind)}
            tensors[f"{name}::{act}.scale"], tensors[f"{name}::{act}.zero"] = q.scale.float(), q.zero.to(torch.int32)
        if layer.kind != "attention":
            entry.update(w_bits=layer.w_bits, weight_shape=list(layer.weight_shape), tcr=False)
            tensors[f"{name}::weight"], tensors[f"{name}::weight_scale"] = layer.weight, layer.weight_scale.float()
        layers[name] = entry
    manifest = {"version": 1, "method": state.method, "bits": state.bits, "group_edges": state.group_edges,
                "model_fingerprint": state.model_fingerprint, "model_class": state.model_class,
                "float_layers": state.float_layers, "settings": {}, "layers": layers}
    tensors = {k: v.contiguous() for k, v in tensors.items()}
    metadata = {"tcaq_calib_state": json.dumps(manifest), "tcaq_sha256": state_mod._digest(tensors)}
    save_file(tensors, str(path), metadata=metadata)
    return path


def test_version_1_file_loads_as_an_unsplit_current_state(ref_state_w8a8, ref_unet, tmp_path):
    loaded = CalibState.load(_write_v1_by_hand(ref_state_w8a8, tmp_path / "v1.tcaq"))
    loaded.validate(ref_unet)
    assert loaded.version == STATE_VERSION and all(l.input_split is None for l in loaded.layers.values())
    name = next(n for n, l in ref_state_w8a8.layers.items() if l.kind == "conv2d")
    assert torch.equal(loaded.layers[name].weight, ref_state_w8a8.layers[name].weight)
    resaved = CalibState.load(loaded.save(tmp_path / "v4.tcaq"))  # written back as the current version
    assert resaved.version == STATE_VERSION and set(resaved.layers) == set(ref_state_w8a8.layers)


def _set_skip_bits(s):
    act = s.layers[LAYER].acts["input_skip"]
    act.bits, act.zero = 6, torch.zeros_like(act.zero)  # a valid 6-bit quantizer on its own


def _skip_without_split(s):
    s.layers[LAYER].input_split = None


def _split_without_skip(s):
    s.layers[LAYER].acts.pop("input_skip")


def _split_on_attention(s):
    name = next(n for n, l in s.layers.items() if l.kind == "attention")
    s.layers[name].input_split = 4


SPLIT_CASES = {
    "zero": (lambda s: setattr(s.layers[LAYER], "input_split", 0), "input_split 0 must lie strictly inside the 256"),
    "end": (lambda s: setattr(s.layers[LAYER], "input_split", 256), "input_split 256 must lie strictly inside"),
    "not_int": (lambda s: setattr(s.layers[LAYER], "input_split", 12.5), "input_split must be an integer"),
    "bits": (_set_skip_bits, "same bits, got input 8 and input_skip 6"),
    "skip_without_split": (_skip_without_split, "'input_skip' activation quantizer but no input_split"),
    "split_without_skip": (_split_without_skip, r"activation quantizers \['input'\], expected \['input', 'input_skip'\]"),
    "attention": (_split_on_attention, "attention layers have no split input"),
}


@pytest.mark.parametrize("case", sorted(SPLIT_CASES))
def test_bad_split_is_rejected_naming_the_layer(case, ref_state_w8a8, ref_unet):
    fn, message = SPLIT_CASES[case]
    state = _with_split(ref_state_w8a8)
    fn(state)
    with pytest.raises(CalibStateError, match=message) as info:
        state.validate(ref_unet)
    assert str(info.value).startswith("layer '")
