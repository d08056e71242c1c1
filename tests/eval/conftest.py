"""Fixtures of the evaluation tests: the shared files, a private feature cache, the test-set features.

The shared files (ResNet-56 weights, CIFAR-10 test npz) live in the `shared/` folder beside the
repository; a missing file fails the tests that need it with a message saying where it was looked for
(never a skip: a harness that cannot be checked must not look green).
"""
from __future__ import annotations

import contextlib
from pathlib import Path

import pytest
import torch

SHARED = Path(__file__).resolve().parents[2] / ".." / "shared"
RESNET56 = SHARED / "models" / "resnet56-cifar10" / "resnet56-4bfd9763.th"
CIFAR10_TEST = SHARED / "data" / "cifar10-test-jpeg.npz"


def _need(path: Path) -> Path:
    if not path.is_file():
        pytest.fail(f"shared file missing: {path.resolve()} (the tests expect the project's shared/ folder "
                    f"beside the repository, holding models/resnet56-cifar10 and data/cifar10-test-jpeg.npz)")
    return path


@contextlib.contextmanager
def one_thread():
    """Run torch on one CPU thread, then restore.

    These tests run small batches, which gain little from a second thread, and CPUs here are often
    shared with other jobs: two OpenMP threads competing with another process for two cores ran the
    UNet up to 30× slower than one thread did. One thread keeps the folder's run time predictable.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def _one_thread():
    with one_thread():
        yield


@pytest.fixture(scope="session")
def resnet56_path() -> Path:
    return _need(RESNET56)


@pytest.fixture(scope="session")
def cifar10_test_npz() -> Path:
    return _need(CIFAR10_TEST)


@pytest.fixture(scope="session")
def feature_cache(tmp_path_factory) -> Path:
    """A cache folder private to this test session (the user's ~/.cache is never touched)."""
    return tmp_path_factory.mktemp("tcaq-cache")


@pytest.fixture(scope="session")
def reference(cifar10_test_npz, resnet56_path, feature_cache):
    """Features/logits of all 10,000 test images, computed once per session (~35 s on one core)."""
    from tcaq_kernels.eval.fid import reference_features

    with one_thread():
        ref = reference_features(cifar10_test_npz, resnet56_path, feature_cache, device="cpu", progress=False)
    assert not ref.from_cache
    return ref
