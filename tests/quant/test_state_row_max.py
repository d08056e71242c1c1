"""CalibState version 4: `p_row_max` on attention layers round-trips (beside `p_row_norm`, each written only
where set), version-3 files load without it, and a version-3 reader refuses a version-4 file (it would
quantize the softmax where the state's scales were fitted to exp(S − row max)). A flag on a non-attention
layer: test_state_row_norm.py, for both flags."""
from __future__ import annotations

import copy
import json

import pytest
from safetensors import safe_open

from tcaq_kernels import CalibState, CalibStateError
from tcaq_kernels.quant import state as state_mod


def _attention_layers(state):
    return [n for n, l in state.layers.items() if l.kind == "attention"]


def test_row_max_round_trips(ref_state_w8a8, ref_unet, tmp_path):
    state = copy.deepcopy(ref_state_w8a8)
    names = _attention_layers(state)
    assert len(names) >= 2, "the reference model has several attention layers"
    state.layers[names[0]].p_row_max = True
    state.layers[names[1]].p_row_max = state.layers[names[1]].p_row_norm = True  # the two flags combine
    state.validate(ref_unet)
    path = state.save(tmp_path / "rowmax.tcaq")
    with safe_open(str(path), framework="pt") as fh:
        manifest = json.loads(fh.metadata()["tcaq_calib_state"])
    layers = manifest["layers"]
    assert manifest["version"] == 4 and layers[names[0]]["p_row_max"] is True and "p_row_norm" not in layers[names[0]]
    assert layers[names[1]]["p_row_max"] is True and layers[names[1]]["p_row_norm"] is True
    assert all("p_row_max" not in layers[n] for n in names[2:])  # written only where set
    loaded = CalibState.load(path)
    loaded.validate(ref_unet)
    assert [loaded.layers[n].p_row_max for n in names] == [True, True] + [False] * (len(names) - 2)
    assert [loaded.layers[n].p_row_norm for n in names] == [False, True] + [False] * (len(names) - 2)
    assert loaded.tensor_digest() == state.tensor_digest()  # a manifest flag, no tensor


def test_version_3_file_loads_without_row_max(ref_state_w8a8, ref_unet, tmp_path):
    state = copy.deepcopy(ref_state_w8a8)
    state.version = 3  # as the version-3 writer labelled its files: no p_row_max anywhere
    state.layers[_attention_layers(state)[0]].p_row_norm = True
    loaded = CalibState.load(state.save(tmp_path / "v3.tcaq"))
    loaded.validate(ref_unet)
    assert loaded.version == state_mod.STATE_VERSION == 4
    assert not any(l.p_row_max for l in loaded.layers.values())
    assert sum(l.p_row_norm for l in loaded.layers.values()) == 1


def test_version_3_reader_refuses_a_version_4_file(ref_state_w8a8, tmp_path, monkeypatch):
    state = copy.deepcopy(ref_state_w8a8)
    state.layers[_attention_layers(state)[0]].p_row_max = True
    path = state.save(tmp_path / "v4.tcaq")
    monkeypatch.setattr(state_mod, "READABLE_VERSIONS", (1, 2, 3))
    with pytest.raises(CalibStateError, match=r"unknown CalibState version 4"):
        CalibState.load(path)
