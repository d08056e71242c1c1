"""CalibState version 3: `p_row_norm` on attention layers round-trips, older files load without it,
a flag on a non-attention layer is refused by name, and a version-2 reader's refusal is what a
version-3 file gets from it (versions it does not know are errors, not guesses)."""
from __future__ import annotations

import copy
import json

import pytest
from safetensors import safe_open

from tcaq_kernels import CalibState, CalibStateError
from tcaq_kernels.quant import state as state_mod


def _attention_layers(state):
    return [n for n, l in state.layers.items() if l.kind == "attention"]


def test_row_norm_round_trips(ref_state_w8a8, ref_unet, tmp_path):
    state = copy.deepcopy(ref_state_w8a8)
    names = _attention_layers(state)
    assert names, "the reference model has attention layers"
    state.layers[names[0]].p_row_norm = True
    state.validate(ref_unet)
    path = state.save(tmp_path / "rownorm.tcaq")
    with safe_open(str(path), framework="pt") as fh:
        manifest = json.loads(fh.metadata()["tcaq_calib_state"])
    assert manifest["version"] == 4 and manifest["layers"][names[0]]["p_row_norm"] is True
    assert all("p_row_norm" not in manifest["layers"][n] for n in names[1:])  # written only where set
    loaded = CalibState.load(path)
    loaded.validate(ref_unet)
    assert [loaded.layers[n].p_row_norm for n in names] == [True] + [False] * (len(names) - 1)
    assert loaded.tensor_digest() == state.tensor_digest()  # a manifest flag, no tensor


@pytest.mark.parametrize("flag", ["p_row_norm", "p_row_max"])
def test_attention_flag_on_a_conv_is_named(ref_state_w8a8, ref_unet, flag):
    state = copy.deepcopy(ref_state_w8a8)
    name = next(n for n, l in state.layers.items() if l.kind == "conv2d")
    setattr(state.layers[name], flag, True)
    with pytest.raises(CalibStateError, match=f"layer '{name}': {flag} is for attention layers"):
        state.validate(ref_unet)


def test_version_2_reader_refuses_a_version_3_file(ref_state_w8a8, tmp_path, monkeypatch):
    state = copy.deepcopy(ref_state_w8a8)
    state.version = 3  # as the version-3 writer labelled its files (the layout is the current one's, no row-max flag)
    path = state.save(tmp_path / "v3.tcaq")
    monkeypatch.setattr(state_mod, "READABLE_VERSIONS", (1, 2))
    with pytest.raises(CalibStateError, match=r"unknown CalibState version 3"):
        CalibState.load(path)
