"""Kernel tests: on CPU the Triton kernels run in the interpreter (small shapes), on a GPU compiled."""
import os

import pytest
import torch

# TRITON_INTERPRET and the `cuda` marker are set up in tests/conftest.py, before anything imports triton.


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
