"""FID-ResNet56, the IS-like score, the test-set floor, and Inception FID where its weights exist.

FID-ResNet56 is the Fréchet distance between Gaussians fitted to the 64-d pooled ResNet-56 features
of generated images and of the 10,000 CIFAR-10 test images (see `resnet56`). It is not comparable to
a paper's Inception FID; it is comparable between rows measured with this module. The reference
features are computed once and cached on disk under a key hashed from everything they depend on
(the npz's bytes, the weights' bytes, the JPEG decoder's version, this module's feature version), so
a changed input can never reuse stale statistics.

The *floor* is FID-ResNet56 between two disjoint halves of the test set (even vs odd indices; the file
is sorted by class, so this split gives each half 500 images of every class): the value real images
reach against real images at 5,000 vs 5,000. Generated-image numbers should be read against it.
"""
from __future__ import annotations

import hashlib
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from ..atomic import atomic_save_npz

#: Bump when feature extraction changes in a way that changes the numbers (invalidates caches).
FEATURE_VERSION = "resnet56-pool64-v1"


# ----------------------------------------------------------------------------- pure math


def gaussian_stats(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and (unbiased, ddof=1) covariance of features [N, D], in float64."""
    f = np.asarray(features, dtype=np.float64)
    if f.ndim != 2 or len(f) < 2:
        raise ValueError(f"need features [N >= 2, D], got shape {f.shape}")
    return f.mean(axis=0), np.cov(f, rowvar=False)


def _sqrt_psd(a: np.ndarray) -> np.ndarray:
    """Symmetric square root of a PSD matrix by eigendecomposition (negative rounding clipped)."""
    w, v = np.linalg.eigh((a + a.T) / 2)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """‖μ1−μ2‖² + tr Σ1 + tr Σ2 − 2 tr (Σ1 Σ2)^{1/2}.

    tr (Σ1 Σ2)^{1/2} is computed as Σ √λ of Σ1^{1/2} Σ2 Σ1^{1/2}, which is symmetric PSD and has the
    same eigenvalues as Σ1 Σ2. This stays real and stable for the singular covariances that small
    sample counts give (where `scipy.linalg.sqrtm` of the non-symmetric product can turn complex).
    """
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    s1, s2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    d = mu1.shape[0]
    if mu1.shape != (d,) or mu2.shape != (d,) or s1.shape != (d, d) or s2.shape != (d, d):
        raise ValueError(f"shape mismatch: mu {mu1.shape} {mu2.shape}, sigma {s1.shape} {s2.shape}")
    for name, arr in (("mu1", mu1), ("mu2", mu2), ("sigma1", s1), ("sigma2", s2)):
        if not np.all(np.isfinite(arr)):
            raise ValueError(f"{name} has non-finite entries")
    r1 = _sqrt_psd(s1)
    eig = np.linalg.eigvalsh((r1 @ s2 @ r1 + (r1 @ s2 @ r1).T) / 2)
    tr_covmean = np.sqrt(np.clip(eig, 0, None)).sum()
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * tr_covmean)


def fid_from_features(feats_a: np.ndarray, feats_b: np.ndarray) -> float:
    return frechet_distance(*gaussian_stats(feats_a), *gaussian_stats(feats_b))


#: Fewest samples a split of the IS-like score may hold; with fewer, p(y) of a split is noise.
MIN_SPLIT_SIZE = 50


def effective_splits(n: int, splits: int) -> int:
    """`splits`, reduced so that every split holds at least MIN_SPLIT_SIZE samples (at least 1)."""
    return max(1, min(int(splits), n // MIN_SPLIT_SIZE))


def is_like_score(logits: np.ndarray, splits: int = 10) -> tuple[float, float]:
    """Inception-Score formula on a classifier's logits: exp E_x KL(p(y|x) ‖ p(y)), mean ± std over splits.

    Split j holds samples j, j+splits, j+2·splits, … (strided rather than contiguous, so a set stored
    in class order — like the CIFAR test file — still gets mixed splits); `splits` is reduced by
    `effective_splits` for small N (8 samples in 8 splits would score exactly 1).
    Higher means confident and diverse predictions; over 10 CIFAR classes the maximum is 10.
    """
    lg = np.asarray(logits, dtype=np.float64)
    if lg.ndim != 2 or len(lg) == 0:
        raise ValueError(f"need logits [N, classes], got shape {lg.shape}")
    lg = lg - lg.max(axis=1, keepdims=True)
    logp = lg - np.log(np.exp(lg).sum(axis=1, keepdims=True))
    scores = []
    k = effective_splits(len(lg), splits)
    for part in (logp[j::k] for j in range(k)):
        p = np.exp(part)
        log_py = np.log(p.mean(axis=0) + 1e-300)
        scores.append(np.exp((p * (part - log_py)).sum(axis=1).mean()))
    return float(np.mean(scores)), float(np.std(scores))


# ----------------------------------------------------------------------------- reference set + cache


def cache_dir(override: str | os.PathLike | None = None) -> Path:
    """`override`, else `$TCAQ_CACHE`, else `~/.cache/tcaq_kernels`."""
    if override:
        return Path(override)
    env = os.environ.get("TCAQ_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "tcaq_kernels"


def sha256_file(path: Path) -> str:
    """Hex SHA-256 of a file's bytes, read in 1 MiB chunks (cache keys, result rows)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def reference_key(npz_path: Path, weights_path: Path) -> str:
    """Cache key: sha256 over the inputs' hashes, the JPEG decoder version and FEATURE_VERSION.

    The device is not part of it: CPU and H100 features gave floors agreeing to 5e-8 relative.
    """
    import PIL

    parts = [FEATURE_VERSION, sha256_file(npz_path), sha256_file(weights_path), f"PIL-{PIL.__version__}"]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


@dataclass
class ReferenceFeatures:
    """ResNet-56 features/logits of the real test images, plus the labels and where they came from."""

    features: np.ndarray  # [N, 64] float64
    logits: np.ndarray  # [N, 10] float64
    labels: np.ndarray  # [N] int64
    key: str
    cache_path: Optional[Path]
    from_cache: bool

    def stats(self) -> tuple[np.ndarray, np.ndarray]:
        return gaussian_stats(self.features)


def reference_features(
    npz_path: str | os.PathLike | None = None,
    weights_path: str | os.PathLike | None = None,
    cache: str | os.PathLike | None = None,
    device=None,
    batch_size: int = 250,
    progress: bool = True,
    use_cache: bool = True,
) -> ReferenceFeatures:
    """Features of all test images, read from the cache when present, else computed and cached.

    The cache file is written atomically, so concurrent or interrupted runs cannot leave a partial one.
    """
    from .data import cifar10_test_path, load_cifar10_test, resnet56_weights_path

    npz_path, weights_path = cifar10_test_path(npz_path), resnet56_weights_path(weights_path)
    key = reference_key(npz_path, weights_path)
    path = cache_dir(cache) / f"resnet56-cifar10-test-{key[:24]}.npz"
    if use_cache and path.is_file():
        try:
            with np.load(path) as z:
                if str(z["key"]) == key:
                    return ReferenceFeatures(z["features"], z["logits"], z["labels"], key, path, True)
        except (OSError, KeyError, ValueError, EOFError, zipfile.BadZipFile):
            pass  # unreadable entry: recompute and overwrite it
    from .resnet56 import extract, load_resnet56

    images, labels = load_cifar10_test(npz_path)
    model = load_resnet56(weights_path, device=device)
    feats, logits = extract(model, images, batch_size=batch_size, progress=progress, desc="ResNet-56 (test set)")
    if use_cache:
        atomic_save_npz(path, features=feats, logits=logits, labels=labels, key=np.array(key))
    return ReferenceFeatures(feats, logits, labels, key, path if use_cache else None, False)


# ----------------------------------------------------------------------------- metrics


def fid_resnet56(
    images,
    reference: ReferenceFeatures | None = None,
    model=None,
    device=None,
    batch_size: int = 250,
    is_splits: int = 10,
    progress: bool = True,
) -> dict:
    """FID-ResNet56 and the IS-like score of uint8 NHWC images against the test-set reference.

    `reference` and `model` default to the shared files (reference features via the cache).
    """
    from .resnet56 import extract, load_resnet56

    if reference is None:
        reference = reference_features(device=device, progress=progress)
    if model is None:
        model = load_resnet56(device=device)
    feats, logits = extract(model, images, batch_size=batch_size, device=device, progress=progress)
    is_mean, is_std = is_like_score(logits, is_splits)
    return {
        "fid_resnet56": fid_from_features(feats, reference.features),
        "is_resnet56": is_mean,
        "is_resnet56_std": is_std,
        "is_splits": effective_splits(len(feats), is_splits),
        "n_samples": int(len(feats)),
        "n_reference": int(len(reference.features)),
    }


def floor_resnet56(reference: ReferenceFeatures | None = None, is_splits: int = 10) -> dict:
    """FID-ResNet56 of test-set half A (even indices) vs half B (odd indices), and the real IS-like score."""
    if reference is None:
        reference = reference_features()
    a, b = reference.features[0::2], reference.features[1::2]
    is_mean, is_std = is_like_score(reference.logits, is_splits)
    return {
        "fid_resnet56": fid_from_features(a, b),
        "is_resnet56": is_mean,  # of all reference images
        "is_resnet56_std": is_std,
        "n_a": int(len(a)),
        "n_b": int(len(b)),
        "split": "even vs odd test indices (class-balanced halves)",
    }


# ----------------------------------------------------------------------------- Inception FID (optional)

#: File name of the FID Inception-v3 weights as pytorch-fid keeps them in the torch hub cache.
INCEPTION_WEIGHTS_NAME = "pt_inception-2015-12-05-6726825d.pth"


def inception_weights_path() -> Optional[Path]:
    """Local FID Inception weights (`$TCAQ_INCEPTION_WEIGHTS` or the torch hub cache), or None."""
    env = os.environ.get("TCAQ_INCEPTION_WEIGHTS")
    candidates = [Path(env)] if env else []
    try:
        import torch

        candidates.append(Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_WEIGHTS_NAME)
    except Exception:  # pragma: no cover - torch always imports in this package
        pass
    return next((p for p in candidates if p.is_file()), None)


def inception_fid_status() -> tuple[bool, str]:
    """(available, reason). Never downloads: the weights must already be on disk."""
    path = inception_weights_path()
    if path is None:
        return False, (
            f"Inception-v3 FID weights ({INCEPTION_WEIGHTS_NAME}) are not on this machine "
            "(looked at $TCAQ_INCEPTION_WEIGHTS and the torch hub cache); they are not downloaded, "
            "so only FID-ResNet56 is reported"
        )
    try:
        import pytorch_fid.inception  # noqa: F401
    except ImportError:
        return False, f"Inception weights found at {path}, but the pytorch-fid package is not installed"
    return True, str(path)


def inception_fid(images, reference_images, device=None, batch_size: int = 200) -> dict:
    """Standard Inception FID (pool3, 2048-d) via pytorch-fid when its weights are local.

    Returns {"available": False, "reason": ...} otherwise. The weights are loaded from the local file
    only; the network is pytorch-fid's, so numbers match that tool.
    """
    ok, info = inception_fid_status()
    if not ok:
        return {"available": False, "reason": info}
    import tempfile

    import torch
    from pytorch_fid.inception import InceptionV3

    # pytorch-fid fetches its weights through the torch hub cache; point the hub at a temporary folder
    # whose checkpoints/ holds a link to the local file, so the loader finds it and never downloads.
    old_hub = torch.hub.get_dir()
    with tempfile.TemporaryDirectory() as hub:
        (Path(hub) / "checkpoints").mkdir()
        (Path(hub) / "checkpoints" / INCEPTION_WEIGHTS_NAME).symlink_to(Path(info).resolve())
        torch.hub.set_dir(hub)
        try:
            model = InceptionV3([InceptionV3.BLOCK_INDEX_BY_DIM[2048]]).eval().to(device)
        finally:
            torch.hub.set_dir(old_hub)

    @torch.no_grad()
    def feats(imgs) -> np.ndarray:
        out = []
        for lo in range(0, len(imgs), batch_size):
            x = torch.as_tensor(imgs[lo : lo + batch_size]).to(device).permute(0, 3, 1, 2).float() / 255
            out.append(model(x)[0].flatten(1).double().cpu().numpy())
        return np.concatenate(out)

    return {"available": True, "fid_inception": fid_from_features(feats(images), feats(reference_images)), "weights": info}
