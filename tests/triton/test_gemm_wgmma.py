"""The Gluon wgmma W8A8 GEMM (sm_90 only) against `ops/reference.py`, every config forced in turn.

GPU-only: Gluon kernels do not run in Triton's interpreter. On the CPU, tests/triton/test_profile_tools.py
checks what the kernel compiles to for sm_90 (one wgmma in flight, no spills)."""
import pytest
import torch

from tcaq_kernels.ops import reference as R
from tcaq_kernels.ops.triton_ops import prepare_linear_weight
from tcaq_kernels.triton import gemm as G
from tcaq_kernels.triton import gemm_wgmma as W

from _tables import Tables, assert_float_close, rand_int

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.get_device_capability() != (9, 0), reason="needs an sm_90 GPU")]

# (B, rows per sample, K, N): M from one tile to several, K not a BLOCK_K multiple, N not a tile multiple
SHAPES = [(2, 37, 272, 45), (1, 200, 1280, 320), (4, 33, 80, 200), (2, 512, 5120, 1280)]


@pytest.fixture(params=range(len(W.CONFIGS)), ids=lambda i: "x".join(map(str, W.CONFIGS[i])))
def config(request, monkeypatch):
    """The wgmma module with one config of its kernel forced (the autotuner's list and cache restored afterwards)."""
    monkeypatch.setattr(W._tuned, "configs", [W._tuned.configs[request.param]])
    monkeypatch.setattr(W._tuned, "cache", {})
    return W


def _run(W, a, w, t, w_scale, bias, out):
    B, L, K = a.shape
    w_q, w_sum = prepare_linear_weight(w, 8)
    a2 = a.reshape(B * L, K)
    assert W.supported(a2, w_q, None, out, None)
    return W.qgemm_wgmma(a2, w_q, w_sum, w_scale, bias, t.scale, t.zero, t.group, 1, L, out)


@pytest.mark.parametrize("shape", SHAPES)
def test_accumulator_exact(gen, config, shape):
    """Unit scales, fp32 output: float(int32 accumulator − z·Σw), compared exactly; NaN-poisoned output."""
    B, L, K, N = shape
    a, w = rand_int(gen, (B, L, K), 8, "cuda"), rand_int(gen, (N, K), 8, "cuda")
    t = Tables(gen, groups=4, batch=B, bits=8, device="cuda", unit_scale=True)
    out = torch.full((B * L, N), float("nan"), device="cuda")
    y = _run(config, a, w, t, torch.ones(N, device="cuda"), None, out)
    ref = R.int_linear(a, w, t.per_sample(t.zero, 3)).float().reshape(B * L, N)
    assert torch.equal(y, ref)


@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float16])
def test_scaled_bias_output(gen, config, out_dtype):
    B, L, K, N = 3, 70, 640, 136
    a, w = rand_int(gen, (B, L, K), 8, "cuda"), rand_int(gen, (N, K), 8, "cuda")
    t = Tables(gen, groups=5, batch=B, bits=8, device="cuda")
    w_scale = (torch.rand(N, generator=gen) * 0.01 + 1e-3).cuda()
    bias = torch.randn(N, generator=gen).to(out_dtype).cuda()
    out = torch.full((B * L, N), float("nan"), device="cuda", dtype=out_dtype)
    y = _run(config, a, w, t, w_scale, bias, out)
    acc = R.int_linear(a, w, t.per_sample(t.zero, 3))
    ref = R.epilogue(acc, w_scale, t.per_sample(t.scale, 3), bias.float(), -1).reshape(B * L, N)
    assert_float_close(y, ref, "wgmma qgemm")


def test_qgemm_routes_supported_calls_when_enabled(gen, monkeypatch):
    """With USE_WGMMA, `qgemm` hands int8×int8 float-output calls to the wgmma kernel and the rest not."""
    calls = []
    real = W.qgemm_wgmma
    monkeypatch.setattr(W, "qgemm_wgmma", lambda *a: calls.append(1) or real(*a))
    monkeypatch.setattr(G, "USE_WGMMA", True)
    M, K, N = 96, 256, 64
    a, w = rand_int(gen, (M, K), 8, "cuda"), rand_int(gen, (N, K), 8, "cuda")
    t = Tables(gen, groups=2, batch=1, bits=8, device="cuda", unit_scale=True)
    for bits, expect in ((8, 1), (4, 1)):  # int4 weights stay on the tl.dot kernel
        w_q, w_sum = prepare_linear_weight(w if bits == 8 else rand_int(gen, (N, K), 4, "cuda"), bits)
        out = torch.empty(M, N, device="cuda")
        G.qgemm(a, w_q, w_sum, torch.ones(N, device="cuda"), None, t.s_inv, t.scale, t.zero, t.group, 0, M, 8,
                None, None, out)
        assert len(calls) == expect
