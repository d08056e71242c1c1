"""Fréchet distance, the IS-like score, the reference-feature cache and FID-ResNet56 itself."""
from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg

from tcaq_kernels.eval import fid as F


@pytest.fixture
def rs() -> np.random.Generator:
    return np.random.default_rng()  # fresh random inputs every run


def _random_spd(rs, d, rank=None):
    a = rs.standard_normal((d, rank or d))
    return a @ a.T / d + (0 if rank else 0.1 * np.eye(d))


def test_frechet_closed_form_diagonal(rs):
    d = 16
    mu1, mu2 = rs.standard_normal(d), rs.standard_normal(d)
    a, b = rs.uniform(0.1, 3, d), rs.uniform(0.1, 3, d)
    expect = ((mu1 - mu2) ** 2).sum() + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum()
    assert F.frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expect, rel=1e-9)


def test_frechet_closed_form_commuting(rs):
    """Covariances sharing an eigenbasis Q: the distance is that of their spectra."""
    d = 12
    q, _ = np.linalg.qr(rs.standard_normal((d, d)))
    a, b = rs.uniform(0.05, 4, d), rs.uniform(0.05, 4, d)
    s1, s2 = (q * a) @ q.T, (q * b) @ q.T
    mu = rs.standard_normal(d)
    expect = ((np.sqrt(a) - np.sqrt(b)) ** 2).sum()
    assert F.frechet_distance(mu, s1, mu, s2) == pytest.approx(expect, rel=1e-8)


def test_frechet_matches_scipy_sqrtm(rs):
    d = 20
    s1, s2 = _random_spd(rs, d), _random_spd(rs, d)
    mu1, mu2 = rs.standard_normal(d), rs.standard_normal(d)
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    expect = ((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean)
    assert F.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expect, rel=1e-7)


def test_frechet_identity_symmetry_and_singular(rs):
    d = 32
    s1, s2 = _random_spd(rs, d, rank=5), _random_spd(rs, d, rank=7)  # singular, as with few samples
    mu1, mu2 = rs.standard_normal(d), rs.standard_normal(d)
    v = F.frechet_distance(mu1, s1, mu2, s2)
    assert np.isfinite(v) and v > 0
    assert F.frechet_distance(mu2, s2, mu1, s1) == pytest.approx(v, rel=1e-7)
    # Zero eigenvalues become ~1e-8 after the square root, so "zero" is ~1e-7 here, not 1e-15.
    assert abs(F.frechet_distance(mu1, s1, mu1, s1)) < 1e-6 * np.trace(s1)
    with pytest.raises(ValueError, match="shape"):
        F.frechet_distance(mu1, s1, mu2[:-1], s2)


def test_fid_from_features_of_gaussians(rs):
    """Samples from two known Gaussians: the estimate approaches the closed form."""
    d, n = 4, 200_000
    x = rs.standard_normal((n, d))
    y = rs.standard_normal((n, d)) * 2 + 1
    expect = d * 1.0 + d * (1 - 2) ** 2  # ‖Δμ‖² + Σ(σ1 − σ2)²
    assert F.fid_from_features(x, y) == pytest.approx(expect, rel=0.02)


def test_is_like_score_bounds(rs):
    n, k = 1000, 10
    assert F.is_like_score(rs.standard_normal((1, k)).repeat(n, 0), splits=5)[0] == pytest.approx(1.0)
    labels = np.sort(np.arange(n) % k)  # class-sorted, like the CIFAR test file
    confident = np.full((n, k), -50.0)
    confident[np.arange(n), labels] = 50.0
    mean, std = F.is_like_score(confident, splits=10)
    assert mean == pytest.approx(k, rel=1e-6) and std < 1e-6
    assert F.is_like_score(rs.standard_normal((n, k)))[0] > 1.0


def test_effective_splits():
    assert F.effective_splits(10000, 10) == 10
    assert F.effective_splits(120, 10) == 2
    assert F.effective_splits(8, 10) == 1
    assert F.effective_splits(8, 1) == 1


def test_cache_dir_env_override(monkeypatch, tmp_path):
    monkeypatch.setenv("TCAQ_CACHE", str(tmp_path / "c"))
    assert F.cache_dir() == tmp_path / "c"
    assert F.cache_dir(tmp_path / "x") == tmp_path / "x"
    monkeypatch.delenv("TCAQ_CACHE")
    assert F.cache_dir().parts[-2:] == (".cache", "tcaq_kernels")


def test_reference_cache_hit_is_identical(reference, cifar10_test_npz, resnet56_path, feature_cache):
    again = F.reference_features(cifar10_test_npz, resnet56_path, feature_cache, progress=False)
    assert again.from_cache and again.key == reference.key
    np.testing.assert_array_equal(again.features, reference.features)
    np.testing.assert_array_equal(again.logits, reference.logits)
    assert [p.name for p in feature_cache.iterdir()] == [reference.cache_path.name]  # no temp files left


def test_reference_key_follows_input_bytes(tmp_path, cifar10_test_npz, resnet56_path):
    copy = tmp_path / "copy.npz"
    copy.write_bytes(cifar10_test_npz.read_bytes())
    k1 = F.reference_key(copy, resnet56_path)
    assert k1 == F.reference_key(cifar10_test_npz, resnet56_path)
    with np.load(cifar10_test_npz) as z:
        arrays = dict(z)
    arrays["labels"] = arrays["labels"].copy()
    arrays["labels"][0] ^= 1
    np.savez(copy, **arrays)
    assert F.reference_key(copy, resnet56_path) != k1


def test_floor_and_real_images_beat_noise(reference, resnet56_path, cifar10_test_npz):
    floor = F.floor_resnet56(reference)
    assert floor["n_a"] == floor["n_b"] == 5000
    assert floor["fid_resnet56"] == pytest.approx(
        F.fid_from_features(reference.features[0::2], reference.features[1::2]))
    assert 0 < floor["fid_resnet56"] < 0.5
    assert 7.0 < floor["is_resnet56"] <= 10.0  # real CIFAR images: confident and balanced

    from tcaq_kernels.eval.data import load_cifar10_test
    from tcaq_kernels.eval.resnet56 import load_resnet56

    model = load_resnet56(resnet56_path)
    real, _ = load_cifar10_test(cifar10_test_npz)
    idx = np.random.default_rng().choice(len(real), 300, replace=False)
    noise = np.random.default_rng().integers(0, 256, size=(300, 32, 32, 3), dtype=np.uint8)
    f_real = F.fid_resnet56(real[idx], reference, model=model, progress=False)
    f_noise = F.fid_resnet56(noise, reference, model=model, progress=False)
    assert f_real["n_samples"] == 300 and f_real["n_reference"] == 10000
    assert floor["fid_resnet56"] < f_real["fid_resnet56"] < f_noise["fid_resnet56"] / 5


def test_inception_fid_is_reported_absent_not_downloaded(monkeypatch, tmp_path):
    import torch

    monkeypatch.setenv("TCAQ_INCEPTION_WEIGHTS", str(tmp_path / "none.pth"))
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    ok, why = F.inception_fid_status()
    assert not ok and "not downloaded" in why
    out = F.inception_fid(np.zeros((2, 32, 32, 3), np.uint8), np.zeros((2, 32, 32, 3), np.uint8))
    assert out == {"available": False, "reason": why}
    assert not (tmp_path / "hub").exists()
