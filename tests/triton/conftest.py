"""Kernel tests: on CPU the Triton kernels run in the interpreter (small shapes), on a GPU compiled.

TRITON_INTERPRET must be set before any kernel module is imported (`triton.jit` reads it when it
decorates), which is why this happens at conftest import time.
"""
import os

import pytest
import torch

if torch.cuda.is_available():
    os.environ.setdefault("TCAQ_TRITON_TUNING", "quick")  # integers are tested, not speed
else:
    os.environ.setdefault("TRITON_INTERPRET", "1")


def _fix_interpreter_index_for_numpy_2_4():
    """Triton 3.6's interpreter turns loop bounds into Python ints with `int(array_of_shape_(1,))`,
    which NumPy >= 2.4 rejects ("only 0-dimensional arrays can be converted to Python scalars"),
    so every kernel with a runtime `range` fails under TRITON_INTERPRET=1 (triton-lang/triton#9171,
    fixed upstream by squeezing first). Re-patch `__index__` the same way until the pinned Triton
    has the fix; a no-op when compiled kernels run or NumPy still converts size-1 arrays.
    """
    import numpy as np

    try:
        int(np.zeros(1, dtype=np.int32))
        return
    except TypeError:
        pass
    from triton.runtime import interpreter

    patch_tensor = interpreter._patch_lang_tensor

    def patched(tensor, scope):
        patch_tensor(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    interpreter._patch_lang_tensor = patched


if os.environ.get("TRITON_INTERPRET") == "1":
    _fix_interpreter_index_for_numpy_2_4()


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: needs a CUDA GPU (full-size shapes, compiled kernels)")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="no CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def device():
    return "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture
def gen(request):
    """A generator with a fresh seed per test, printed on failure so a failing draw can be replayed."""
    seed = int.from_bytes(os.urandom(4), "little")
    g = torch.Generator().manual_seed(seed)
    request.node.user_properties.append(("seed", seed))
    print(f"seed={seed}")
    return g
