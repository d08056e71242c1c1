"""Where the shared evaluation files live, and the CIFAR-10 test set they hold.

The feature-network weights and the test images are not part of the package (they are large and carry
their own licences); they sit in the `shared/` folder beside the repository. `TCAQ_SHARED` overrides
that location, and every function also takes an explicit path, so a GPU machine that receives copies
in another folder can point at them.
"""
from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np

#: The repository root (this file is tcaq_kernels/eval/data.py).
REPO_ROOT = Path(__file__).resolve().parents[2]

RESNET56_RELPATH = Path("models") / "resnet56-cifar10" / "resnet56-4bfd9763.th"
CIFAR10_TEST_RELPATH = Path("data") / "cifar10-test-jpeg.npz"


def shared_dir() -> Path:
    """`$TCAQ_SHARED` if set, else the `shared/` folder beside the repository."""
    env = os.environ.get("TCAQ_SHARED")
    return Path(env) if env else (REPO_ROOT.parent / "shared")


def _require(path: Path, what: str) -> Path:
    if not path.is_file():
        raise FileNotFoundError(
            f"{what} not found at {path}. Pass its path explicitly, or set TCAQ_SHARED to the folder "
            f"holding models/ and data/ (default: the shared/ folder beside the repository)."
        )
    return path


def resnet56_weights_path(path: str | os.PathLike | None = None) -> Path:
    """The CIFAR ResNet-56 checkpoint (`resnet56-4bfd9763.th`), checked to exist."""
    return _require(Path(path) if path else shared_dir() / RESNET56_RELPATH, "ResNet-56 weights")


def cifar10_test_path(path: str | os.PathLike | None = None) -> Path:
    """The CIFAR-10 test-set npz (`cifar10-test-jpeg.npz`), checked to exist."""
    return _require(Path(path) if path else shared_dir() / CIFAR10_TEST_RELPATH, "CIFAR-10 test npz")


def load_cifar10_test(path: str | os.PathLike | None = None, limit: int | None = None):
    """Decode the JPEG test set: (uint8 images [N, 32, 32, 3] RGB, int64 labels [N]).

    `limit` decodes only the first `limit` images (tests use it to stay fast).
    """
    from PIL import Image

    path = cifar10_test_path(path)
    with np.load(path) as z:
        for key in ("jpeg", "offsets", "labels"):
            if key not in z:
                raise KeyError(f"{path}: missing array {key!r} (expected jpeg, offsets, labels)")
        jpeg, offsets, labels = z["jpeg"], z["offsets"], z["labels"]
    n = len(labels) if limit is None else min(int(limit), len(labels))
    images = np.empty((n, 32, 32, 3), dtype=np.uint8)
    for i in range(n):
        blob = jpeg[offsets[i] : offsets[i + 1]].tobytes()
        img = np.asarray(Image.open(io.BytesIO(blob)).convert("RGB"))
        if img.shape != (32, 32, 3):
            raise ValueError(f"{path}: image {i} decodes to shape {img.shape}, expected (32, 32, 3)")
        images[i] = img
    return images, labels[:n].astype(np.int64)
