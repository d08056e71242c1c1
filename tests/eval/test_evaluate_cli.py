"""The `evaluate` command end to end on CPU (8 samples, 3 DDIM steps), called through argparse."""
from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from tcaq_kernels.eval.cli import build_parser, run_evaluate

STEPS = 3


def _evaluate(out, cache, npz, weights, *extra):
    argv = ["evaluate", "--out", str(out), "--n-samples", "8", "--steps", str(STEPS), "--batch-size", "4",
            "--device", "cpu", "--cache-dir", str(cache), "--ref-npz", str(npz), "--resnet-weights", str(weights),
            "--is-splits", "2", "--no-progress", *extra]
    args = build_parser().parse_args(argv)
    assert run_evaluate(args) == 0
    return json.loads((out / "report.json").read_text())


@pytest.fixture
def common(reference, feature_cache, cifar10_test_npz, resnet56_path):
    return feature_cache, cifar10_test_npz, resnet56_path


NUMBERS = ("fid_resnet56", "is_resnet56", "is_resnet56_std", "floor_fid_resnet56")


def test_full_precision_report_grid_and_repeatability(tmp_path, common, capsys):
    seed = str(int(np.random.default_rng().integers(0, 10_000)))
    r1 = _evaluate(tmp_path / "a", *common, "--seed-base", seed)
    assert "FID-ResNet56" in capsys.readouterr().out
    for key in NUMBERS:
        assert np.isfinite(r1[key]) and r1[key] >= 0, key
    assert r1["fid_resnet56"] > 0 and r1["is_resnet56"] >= 1.0
    assert r1["is_splits"] == 1 and r1["is_resnet56_std"] == 0.0  # 8 samples: one split, not 2 of 4
    assert r1["n_samples"] == 8 and r1["steps"] == STEPS and r1["eta"] == 0.0
    assert r1["seeds"]["first"] == int(seed) and r1["seeds"]["count"] == 8
    assert r1["fid_resnet56"] > 10 * r1["floor_fid_resnet56"]  # 3-step samples are far from real images
    assert r1["psnr_vs_fp"] is None and "skipped" in r1["fidelity"]
    assert r1["reference"]["n_images"] == 10000
    assert r1["inception_fid"]["available"] in (True, False) and ("reason" in r1["inception_fid"]) != r1["inception_fid"]["available"]
    assert r1["device"].startswith("cpu") and r1["versions"]["torch"] and "triton" in r1["versions"]
    assert r1["command"].startswith("python -m tcaq_kernels evaluate") and f"--seed-base {seed}" in r1["command"]
    assert r1["seconds"] > 0 and r1["sampling"]["shards_total"] == 2
    assert Image.open(tmp_path / "a" / "grid.png").size == (2 * (8 * 34 + 2), 2 * (1 * 34 + 2) + 16)

    # Same seeds, fresh folder: identical numbers. Same folder again: resumes (nothing to sample), identical.
    r2 = _evaluate(tmp_path / "b", *common, "--seed-base", seed)
    r3 = _evaluate(tmp_path / "a", *common, "--seed-base", seed)
    assert r3["sampling"]["shards_skipped_by_rank0"] == 2
    for key in NUMBERS:
        assert r1[key] == r2[key] == r3[key], key


def _has_convert() -> bool:
    import tcaq_kernels

    return hasattr(tcaq_kernels, "convert") and hasattr(tcaq_kernels, "load_state")


def test_quantized_state_is_compared_with_full_precision(tmp_path, common, ref_state_w8a8):
    """With --state: the converted model is sampled and compared with fp on the same seeds."""
    assert _has_convert(), "tcaq_kernels.convert/load_state are part of the public API and must exist"
    state = ref_state_w8a8.save(tmp_path / "w8a8.tcaq")
    r = _evaluate(tmp_path / "q", *common, "--state", str(state), "--backend", "reference", "--fidelity-samples", "4")
    assert r["state"] == str(state) and r["backend"] == "reference"
    assert 15 < r["psnr_vs_fp"] < 100  # W8A8 is close to fp but not identical
    err = r["eps_rel_error"]
    assert len(err["per_step"]) == STEPS and 0 < err["mean"] < 0.5 and err["max"] >= err["mean"]
    assert r["fidelity"]["n_seeds"] == 4
    for key in NUMBERS:
        assert np.isfinite(r[key]), key
    w, h = Image.open(tmp_path / "q" / "grid.png").size
    assert w == 2 * 2 * (8 * 34 + 2) + 12  # two panels: fp | quantized
