"""`triton_ops.call`: the layers' way into the Triton custom ops — direct in eager mode, the op when traced."""
from __future__ import annotations

import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from tcaq_kernels.ops import triton_ops as T


def test_every_op_keeps_its_function():
    ops = (T.quantize_act, T.groupnorm_silu_quantize, T.qlinear, T.qconv2d, T.qattention)
    assert all(op in T._IMPLS and callable(T._IMPLS[op]) for op in ops)


def test_eager_calls_skip_the_dispatcher(monkeypatch):
    seen = []
    monkeypatch.setitem(T._IMPLS, T.qlinear, lambda x, *a, **k: seen.append((x, a, k)) or "direct")
    x = torch.randn(2, 3)
    assert T.call(T.qlinear, x, 1, out_dtype=None) == "direct"
    assert seen[0][0] is x and seen[0][1] == (1,) and seen[0][2] == {"out_dtype": None}


def test_other_callables_are_called_as_they_are():
    assert T.call(lambda x, n: x * n, torch.ones(2), 3).tolist() == [3.0, 3.0]


def test_traced_calls_go_through_the_op(monkeypatch):
    """Under FakeTensorMode (what torch.compile and export trace with) the op's fake implementation
    answers; the Python function, which launches kernels, is never called."""
    monkeypatch.setitem(T._IMPLS, T.qattention, lambda *a, **k: (_ for _ in ()).throw(AssertionError("ran")))
    with FakeTensorMode():
        q = torch.empty(2, 3, 17, 40, dtype=torch.bfloat16)
        k = torch.empty(2, 3, 9, 40, dtype=torch.bfloat16)
        f, i, g = torch.empty(3), torch.empty(3, dtype=torch.int32), torch.empty(2, dtype=torch.int32)
        y = T.call(T.qattention, q, k, k, 0.1, f, f, i, f, f, i, f, f, i, f, f, i, i, g)
    assert y.shape == (2, 3, 17, 40) and y.dtype == torch.bfloat16
