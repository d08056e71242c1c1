"""benchmarks/fid_attribution.py recovers a known relation, holds rows out honestly and reads the table as
stored: synthetic rows with FID = fp · fine^c · e^(b·PSNR) (plus noise for the hold-out check)."""
from __future__ import annotations

import numpy as np
import pytest


@pytest.fixture(scope="module")
def bench(load_benchmark):
    return load_benchmark("fid_attribution")


def rows_from(fine, psnr, c, b, fp, noise=None, bits="W8A8"):
    noise = np.zeros(len(fine)) if noise is None else noise
    rows = [{"preset": "fp", "bits": "fp", "n_samples": 10000, "fid_resnet56": fp}]
    rows += [{"preset": f"p{i}", "bits": bits, "n_samples": 10000, "psnr_vs_fp": float(p), "fine_energy_ratio": float(f),
              "fid_resnet56": float(fp * f**c * np.exp(b * p + e))} for i, (f, p, e) in enumerate(zip(fine, psnr, noise))]
    rows.append({"preset": "other-n", "bits": bits, "n_samples": 2000, "psnr_vs_fp": 30.0, "fine_energy_ratio": 1.0,
                 "fid_resnet56": 99.0})  # another sample count: must not enter the fit
    return rows


def test_recovers_known_coefficients_and_target(bench):
    rng = np.random.default_rng(0)
    fine, psnr = rng.uniform(0.8, 1.3, 9), rng.uniform(25, 50, 9)
    result = bench.analyse(rows_from(fine, psnr, c=-1.1, b=-0.01, fp=3.0))
    fits = result["bits"]["W8A8"]["fits"]
    both = fits["fine + PSNR"]
    assert both["n"] == 9 and both["r2"] == pytest.approx(1.0)
    assert both["coef"]["c"] == pytest.approx(-1.1) and both["coef"]["b"] == pytest.approx(-0.01)
    assert both["loo_rms_pct"] == pytest.approx(0.0, abs=1e-9)
    only_fine = bench.analyse(rows_from(fine, psnr, c=-1.1, b=0.0, fp=3.0))["bits"]["W8A8"]["fits"]["fine"]
    target = bench.fine_for_target(only_fine, 0.02)  # FID = fp·fine^-1.1 → +2 % at fine = 1.02^(-1/1.1)
    assert target == pytest.approx(1.02 ** (-1 / 1.1))


def test_hold_out_error_exceeds_fit_error_with_noise(bench):
    rng = np.random.default_rng(1)
    fine, psnr = rng.uniform(0.8, 1.3, 8), rng.uniform(25, 50, 8)
    noise = rng.normal(0, 0.05, 8)
    fit = bench.analyse(rows_from(fine, psnr, -1.0, 0.0, 3.0, noise))["bits"]["W8A8"]["fits"]["fine"]
    in_sample = 100 * np.sqrt(np.mean(noise**2))
    assert 0 < fit["r2"] < 1 and fit["loo_rms_pct"] > 0.5 * in_sample


def test_too_few_rows_give_no_fit(bench):
    rows = rows_from([0.9, 1.1, 1.0], [30, 40, 35], -1.0, 0.0, 3.0)
    fits = bench.analyse(rows)["bits"]["W8A8"]["fits"]
    assert fits == {"fine": None, "fine + PSNR": None}


def test_writes_json_and_markdown(bench, tmp_path):
    import json
    rng = np.random.default_rng(2)
    path = tmp_path / "quality.json"
    path.write_text(json.dumps(rows_from(rng.uniform(0.8, 1.2, 6), rng.uniform(30, 45, 6), -1.0, 0.0, 3.0)))
    assert bench.main(["--results", str(path), "--out", str(tmp_path)]) == 0
    stored = json.loads((tmp_path / "fid_attribution.json").read_text())
    assert stored["fid_fp"] == 3.0 and stored["w8a8_fine_ratio_for_plus_2pct"] == pytest.approx(1.02 ** -1)
    assert "| W8A8 | 6 | fine |" in (tmp_path / "fid_attribution.md").read_text()
