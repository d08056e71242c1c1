"""CalibState: round trip, atomic save, integrity checks, and layer-named validation errors."""
from __future__ import annotations

import copy

import pytest
import torch

from tcaq_kernels import CalibState, CalibStateError
from tcaq_kernels.quant.primitives import pack_int4


def test_save_load_roundtrip(ref_state_w8a8, ref_unet, tmp_path):
    path = ref_state_w8a8.save(tmp_path / "s.tcaq")
    loaded = CalibState.load(path)
    loaded.validate(ref_unet)
    assert loaded.method == "minmax" and loaded.bits == "W8A8" and loaded.num_groups == 4
    assert loaded.float_layers == ["conv_in", "conv_out"]
    assert set(loaded.layers) == set(ref_state_w8a8.layers)
    for name, layer in ref_state_w8a8.layers.items():
        other = loaded.layers[name]
        for act in layer.acts:
            assert torch.equal(layer.acts[act].scale, other.acts[act].scale)
            assert torch.equal(layer.acts[act].zero, other.acts[act].zero)
            assert layer.acts[act].kind == other.acts[act].kind
        if layer.kind != "attention":
            assert torch.equal(layer.weight, other.weight) and torch.equal(layer.weight_scale, other.weight_scale)
    assert not list(tmp_path.glob(".*.tmp")), "temp file left behind"


def test_save_failure_leaves_previous_file_intact(ref_state_w8a8, tmp_path, monkeypatch):
    path = ref_state_w8a8.save(tmp_path / "s.tcaq")
    before = path.read_bytes()
    broken = copy.deepcopy(ref_state_w8a8)
    name = next(n for n, l in broken.layers.items() if l.kind == "conv2d")
    broken.layers[name].weight = torch.zeros(3, dtype=torch.int8).expand(4, 3)  # non-contiguous view is fine
    import tcaq_kernels.atomic as atomic_mod

    def failing_fsync(fd):  # the new bytes are in the temp file, not yet durable
        raise OSError("disk full")

    monkeypatch.setattr(atomic_mod.os, "fsync", failing_fsync)
    with pytest.raises(OSError, match="disk full"):
        broken.save(path)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.tcaq"]


def test_truncated_file_is_rejected(ref_state_w8a8, tmp_path):
    path = ref_state_w8a8.save(tmp_path / "s.tcaq")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CalibStateError, match="truncated or corrupted"):
        CalibState.load(path)


def test_flipped_byte_is_rejected(ref_state_w8a8, tmp_path):
    path = ref_state_w8a8.save(tmp_path / "s.tcaq")
    data = bytearray(path.read_bytes())
    data[-100] ^= 0x5A
    path.write_bytes(bytes(data))
    with pytest.raises(CalibStateError, match="checksum"):
        CalibState.load(path)


def test_missing_file_and_foreign_safetensors(tmp_path):
    with pytest.raises(CalibStateError, match="no such"):
        CalibState.load(tmp_path / "nope.tcaq")
    from safetensors.torch import save_file

    save_file({"x": torch.ones(2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(CalibStateError, match="not a tcaq CalibState"):
        CalibState.load(tmp_path / "other.safetensors")


def test_unknown_version_is_rejected(ref_state_w8a8, tmp_path, ref_unet):
    state = copy.deepcopy(ref_state_w8a8)
    state.version = 99
    path = state.save(tmp_path / "v99.tcaq")
    with pytest.raises(CalibStateError, match="unknown CalibState version 99"):
        CalibState.load(path)
    with pytest.raises(CalibStateError, match="version"):
        state.validate(ref_unet)


def _first(state, kind):
    return next(n for n, l in state.layers.items() if l.kind == kind)


def _broken(state, fn):
    s = copy.deepcopy(state)
    fn(s)
    return s


CASES = {
    "missing": (lambda s: s.layers.pop(_first(s, "conv2d")), "missing from the state"),
    "extra": (lambda s: s.layers.__setitem__("down_blocks.9.ghost", copy.deepcopy(s.layers[_first(s, "linear")])), "'down_blocks.9.ghost' is in the state but not"),
    "shape": (lambda s: setattr(s.layers[_first(s, "conv2d")], "weight_shape", (1, 2, 3, 3)), "weight shape"),
    "wbits": (lambda s: setattr(s.layers[_first(s, "linear")], "w_bits", 3), "weight bits 3"),
    "abits": (lambda s: setattr(s.layers[_first(s, "linear")].acts["input"], "bits", 2), "bits 2 not in"),
    "nan_scale": (lambda s: s.layers[_first(s, "conv2d")].weight_scale.__setitem__(0, float("nan")), "NaN/inf"),
    "neg_scale": (lambda s: s.layers[_first(s, "conv2d")].acts["input"].scale.__setitem__(1, -1.0), "non-positive"),
    "zero_scale": (lambda s: s.layers[_first(s, "attention")].acts["p"].scale.__setitem__(0, 0.0), "non-positive"),
    "inf_tcr": (lambda s: setattr(s.layers[_first(s, "conv2d")], "tcr", torch.full((s.layers[_first(s, "conv2d")].weight_shape[1],), float("inf"))), "tcr has"),
    "zero_point": (lambda s: s.layers[_first(s, "conv2d")].acts["input"].zero.__setitem__(0, 300), "zero points"),
    "asym_q": (lambda s: s.layers[_first(s, "attention")].acts["q"].zero.__setitem__(0, 3), "symmetric"),
    "groups": (lambda s: setattr(s, "group_edges", [500.0]), "timestep groups"),
    "kind": (lambda s: s.layers[_first(s, "attention")].acts["p"].kind.__setitem__(0, "cubic"), "unknown quantizer kind"),
    "log2_on_conv": (lambda s: s.layers[_first(s, "conv2d")].acts["input"].kind.__setitem__(0, "log2"), "post-softmax"),
    "float_layer": (lambda s: s.float_layers.append("nope.conv"), "float-kept layer 'nope.conv'"),
    "fingerprint": (lambda s: setattr(s, "model_fingerprint", "0" * 16), "fingerprint"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_validate_names_the_layer_at_fault(case, ref_state_w8a8, ref_unet):
    fn, message = CASES[case]
    state = _broken(ref_state_w8a8, fn)
    with pytest.raises(CalibStateError, match=message) as info:
        state.validate(ref_unet)
    per_layer = case not in {"groups", "float_layer", "fingerprint", "extra", "missing"}
    if per_layer:
        assert "layer '" in str(info.value)


def test_validate_int4_storage(ref_state_w8a8, ref_unet):
    state = copy.deepcopy(ref_state_w8a8)
    name = _first(state, "conv2d")
    layer = state.layers[name]
    w = layer.weight_int().flatten(1).clamp(-8, 7)
    layer.w_bits, layer.weight = 4, pack_int4(w)
    state.validate(ref_unet)
    assert torch.equal(layer.weight_int().flatten(1), w)
    layer.weight = w  # unpacked int8 where packed uint8 is required
    with pytest.raises(CalibStateError, match=f"layer '{name}': stored weight"):
        state.validate(ref_unet)


def test_validate_rejects_other_architecture(ref_state_w8a8):
    from diffusers import UNet2DModel

    other = UNet2DModel(sample_size=8, block_out_channels=(32, 32), down_block_types=("DownBlock2D", "DownBlock2D"),
                        up_block_types=("UpBlock2D", "UpBlock2D"), layers_per_block=1, norm_num_groups=8)
    with pytest.raises(CalibStateError, match="fingerprint"):
        ref_state_w8a8.validate(other)
