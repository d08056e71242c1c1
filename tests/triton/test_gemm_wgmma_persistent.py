"""The persistent Gluon GEMM (`gemm_wgmma_persistent.py`, sm_90, `TCAQ_WGMMA=persistent`) against
`ops/reference.py`, every config forced in turn, through `qlinear` (a spy asserts each call reached it).

The shapes give programs several tiles each (the ring then runs across tile boundaries, and a tile's
first MMA must not add the previous tile's accumulator) as well as fewer tiles than SMs."""
import pytest
import torch

from tcaq_kernels.ops import reference as R
from tcaq_kernels.ops.triton_ops import prepare_linear_weight, qlinear
from tcaq_kernels.quant import primitives as P
from tcaq_kernels.triton import gemm as G, gemm_wgmma_persistent as PW

from _tables import Tables, assert_float_close, linear_acc_ref, rand_int
from _wgmma import NEEDS_SM90, check_codes_accumulator, route_to_wgmma

pytestmark = NEEDS_SM90

# (B, rows per sample, K, N): fewer tiles than SMs with odd M/N/K; then 2–20 tiles per program
SHAPES = [(2, 37, 288, 45), (4, 1024, 320, 1280), (2, 2048, 1280, 640), (1, 4096, 96, 2560)]


@pytest.fixture(params=range(len(PW.CONFIGS)), ids=lambda i: "x".join(map(str, PW.CONFIGS[i])))
def persistent(request, monkeypatch):
    calls = route_to_wgmma(monkeypatch, PW, "launch", request.param, keep_prune=True)
    monkeypatch.setattr(G, "WGMMA", "persistent")
    return calls


@pytest.mark.parametrize("w_bits", [8, 4])
@pytest.mark.parametrize("shape", SHAPES)
def test_int8_codes_exact_accumulator(gen, persistent, shape, w_bits):
    check_codes_accumulator(gen, persistent, shape, w_bits)


@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
def test_epilogue_and_next_layer_codes(gen, persistent, out_dtype):
    B, L, K, N = 2, 1500, 640, 392
    a = rand_int(gen, (B, L, K), 8, "cuda")
    w = rand_int(gen, (N, K), 8, "cuda")
    w_scale = (torch.rand(N, generator=gen) * 0.01 + 1e-3).cuda()
    bias = torch.randn(N, generator=gen).cuda()
    residual = torch.randn(B, L, N, generator=gen).to(out_dtype).cuda()
    t, nxt = (Tables(gen, groups=5, batch=B, bits=8, device="cuda") for _ in range(2))
    w_q, w_sum = prepare_linear_weight(w, 8)
    args = (a, w_q, w_sum, w_scale, bias, t.s_inv, t.scale, t.zero, t.group)
    y = qlinear(*args, residual=residual, out_dtype=out_dtype)
    ref = R.epilogue(linear_acc_ref(a, w, t), w_scale, t.per_sample(t.scale, 3), bias, -1) + residual.float()
    assert_float_close(y, ref, "persistent qlinear")
    y32 = qlinear(*args, out_dtype=torch.float32)
    codes = qlinear(*args, out_s_inv=nxt.s_inv, out_zero=nxt.zero)
    assert persistent == [1, 1, 1] and codes.dtype == torch.int8
    assert torch.equal(codes, P.quantize_uniform(y32, t.per_sample(nxt.s_inv, 3), t.per_sample(nxt.zero, 3), 8, None, -1))


def test_float_inputs_and_splits_take_the_other_kernels(gen, persistent):
    t = Tables(gen, groups=2, batch=1, bits=8, device="cuda", unit_scale=True)
    w_q, w_sum = prepare_linear_weight(rand_int(gen, (64, 256), 8, "cuda"), 8)
    args = (w_q, w_sum, torch.ones(64, device="cuda"), None, t.s_inv, t.scale, t.zero, t.group)
    qlinear(torch.randn(96, 256, generator=gen).to(torch.bfloat16).cuda(), *args, out_dtype=torch.float32)
    qlinear(rand_int(gen, (96, 256), 8, "cuda"), *args, out_dtype=torch.float32, split_k=2)
    assert persistent == []
