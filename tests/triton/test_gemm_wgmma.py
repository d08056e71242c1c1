"""The Gluon wgmma GEMM (sm_90 only, `TCAQ_WGMMA=1`) against `ops/reference.py`, every config forced in turn.

Through `qlinear` with the routing switched on, so the launcher's plumbing is under test too; a spy
asserts each call really went to the wgmma kernel. GPU-only: Gluon kernels do not run in Triton's
interpreter. On the CPU, tests/triton/test_profile_tools.py checks what the kernel compiles to for sm_90
(one wgmma in flight, no spills)."""
import pytest
import torch

from tcaq_kernels.ops import reference as R
from tcaq_kernels.ops.triton_ops import prepare_linear_weight, qlinear
from tcaq_kernels.quant import primitives as P
from tcaq_kernels.triton import gemm as G, gemm_wgmma as W

from _tables import Tables, assert_float_close, linear_acc_ref, rand_int
from _wgmma import NEEDS_SM90, check_codes_accumulator, route_to_wgmma

pytestmark = NEEDS_SM90

# (B, rows per sample, K, N): M from one tile to several, K not a BLOCK_K multiple (but K % 32 == 0, so
# packed int4 rows stay 16-byte aligned and route), N not a tile multiple
SHAPES = [(2, 37, 288, 45), (1, 200, 1280, 320), (4, 33, 96, 200), (2, 512, 5120, 1280)]


@pytest.fixture(params=range(len(W.CONFIGS)), ids=lambda i: "x".join(map(str, W.CONFIGS[i])))
def wgmma(request, monkeypatch):
    """Routing on, one config forced (the shared-memory prune kept: it only drops what cannot launch); the
    list of the calls that reached the kernel."""
    return route_to_wgmma(monkeypatch, W, "launch", request.param, keep_prune=True)


@pytest.mark.parametrize("w_bits", [8, 4])
@pytest.mark.parametrize("shape", SHAPES)
def test_int8_codes_exact_accumulator(gen, wgmma, shape, w_bits):
    """Unit scales, fp32 output: float(int32 accumulator − z·Σw), compared exactly."""
    check_codes_accumulator(gen, wgmma, shape, w_bits)


@pytest.mark.parametrize("w_bits", [8, 4])
@pytest.mark.parametrize("a_bits", [8, 6])
@pytest.mark.parametrize("tcr", [False, True])
@pytest.mark.parametrize("shape", SHAPES[:3])
def test_float_input_quantized_in_the_kernel_exact(gen, wgmma, a_bits, tcr, shape, w_bits):
    """bf16 input: the codes made in the kernel must be quantize_uniform's (TCR 1/r first)."""
    B, L, K, N = shape
    x = (torch.randn(B, L, K, generator=gen) * 3).to(torch.bfloat16).cuda()
    w = rand_int(gen, (N, K), w_bits, "cuda")
    t = Tables(gen, groups=3, batch=B, bits=a_bits, device="cuda", unit_scale=True)
    r_inv = (torch.rand(K, generator=gen) + 0.5).cuda() if tcr else None
    w_q, w_sum = prepare_linear_weight(w, w_bits)
    y = qlinear(x, w_q, w_sum, torch.ones(N, device="cuda"), None, t.s_inv, t.scale, t.zero, t.group, a_bits, r_inv,
                out_dtype=torch.float32)
    assert wgmma == [1]
    codes = P.quantize_uniform(x, t.per_sample(t.s_inv, 3), t.per_sample(t.zero, 3), a_bits, r_inv, -1)
    assert torch.equal(y, linear_acc_ref(codes, w, t).float())


@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_epilogue_scale_bias_residual(gen, wgmma, out_dtype):
    B, L, K, N = 3, 70, 640, 136
    x = torch.randn(B, L, K, generator=gen).to(torch.bfloat16).cuda()
    w = rand_int(gen, (N, K), 8, "cuda")
    w_scale = (torch.rand(N, generator=gen) * 0.01 + 1e-3).cuda()
    bias = torch.randn(N, generator=gen).cuda()
    residual = torch.randn(B, L, N, generator=gen).to(out_dtype).cuda()
    t = Tables(gen, groups=5, batch=B, bits=8, device="cuda")
    w_q, w_sum = prepare_linear_weight(w, 8)
    y = qlinear(x, w_q, w_sum, w_scale, bias, t.s_inv, t.scale, t.zero, t.group, residual=residual, out_dtype=out_dtype)
    assert wgmma == [1]
    codes = P.quantize_uniform(x, t.per_sample(t.s_inv, 3), t.per_sample(t.zero, 3), 8, None, -1)
    ref = R.epilogue(linear_acc_ref(codes, w, t), w_scale, t.per_sample(t.scale, 3), bias, -1) + residual.float()
    assert y.dtype == out_dtype
    assert_float_close(y, ref, "wgmma qlinear")


def test_quantized_output_is_the_hosts_quantize_of_its_float_output(gen, wgmma):
    """Next-layer int8 codes from the epilogue equal quantize_uniform of the same kernel's fp32 output."""
    B, L, K, N = 2, 96, 320, 200
    x = torch.randn(B, L, K, generator=gen).to(torch.bfloat16).cuda()
    w_q, w_sum = prepare_linear_weight(rand_int(gen, (N, K), 8, "cuda"), 8)
    w_scale = (torch.rand(N, generator=gen) * 1e-3 + 1e-4).cuda()
    bias = torch.randn(N, generator=gen).cuda()
    t, nxt = (Tables(gen, groups=4, batch=B, bits=8, device="cuda") for _ in range(2))
    out_r_inv = (torch.rand(N, generator=gen) + 0.5).cuda()
    args = (x, w_q, w_sum, w_scale, bias, t.s_inv, t.scale, t.zero, t.group)
    y = qlinear(*args, out_dtype=torch.float32)
    codes = qlinear(*args, out_s_inv=nxt.s_inv, out_zero=nxt.zero, out_r_inv=out_r_inv)
    assert wgmma == [1, 1] and codes.dtype == torch.int8
    expect = P.quantize_uniform(y, t.per_sample(nxt.s_inv, 3), t.per_sample(nxt.zero, 3), 8, out_r_inv, -1)
    assert torch.equal(codes, expect)


@pytest.mark.parametrize("w_bits", [8, 4])
@pytest.mark.parametrize("a_float", [False, True])
@pytest.mark.parametrize("K, split_k", [(1280, 3), (288, 2)])  # splits of 512/512/256 and 256/32 columns
def test_split_k_exact(gen, wgmma, w_bits, a_float, K, split_k):
    """Each split reduces its own K range into int32 partial sums; qgemm's split-K epilogue adds them."""
    B, L, N = 2, 64, 200
    a = rand_int(gen, (B, L, K), 8, "cuda")
    x = (torch.randn(B, L, K, generator=gen) * 3).to(torch.bfloat16).cuda()
    w = rand_int(gen, (N, K), w_bits, "cuda")
    t = Tables(gen, groups=3, batch=B, bits=8, device="cuda", unit_scale=True)
    w_q, w_sum = prepare_linear_weight(w, w_bits)
    inp = x if a_float else a
    y = qlinear(inp, w_q, w_sum, torch.ones(N, device="cuda"), None, t.s_inv, t.scale, t.zero, t.group,
                out_dtype=torch.float32, split_k=split_k)
    assert wgmma == [1]
    codes = P.quantize_uniform(x, t.per_sample(t.s_inv, 3), t.per_sample(t.zero, 3), 8, None, -1) if a_float else a
    assert torch.equal(y, linear_acc_ref(codes, w, t).float())


@pytest.mark.parametrize("w_bits", [8, 4])
def test_fp32_input_autotunes_over_the_configs_that_fit(gen, monkeypatch, w_bits):
    """An fp32 UNet's activations: four times the bytes of codes in the A ring, so the prune keeps only
    the configs that fit shared memory and the autotuner picks among those (a forced 128-row config would
    not launch)."""
    monkeypatch.setattr(G, "WGMMA", "all")
    monkeypatch.setattr(W._tuned, "cache", {})
    B, L, K, N = 2, 100, 640, 192
    limit = torch.cuda.get_device_properties(0).shared_memory_per_block_optin
    fits = W._prune(W._tuned.configs, {"a_ptr": torch.empty(1, device="cuda")}, W4=w_bits == 4, A_FLOAT=True)
    assert 0 < len(fits) < len(W._tuned.configs)
    assert all(W.smem_bytes(c, 4, w_bits == 4, True) <= limit for c in fits)
    x = torch.randn(B, L, K, generator=gen).cuda()
    w = rand_int(gen, (N, K), w_bits, "cuda")
    t = Tables(gen, groups=3, batch=B, bits=8, device="cuda", unit_scale=True)
    w_q, w_sum = prepare_linear_weight(w, w_bits)
    y = qlinear(x, w_q, w_sum, torch.ones(N, device="cuda"), None, t.s_inv, t.scale, t.zero, t.group,
                out_dtype=torch.float32)
    assert W._tuned.best_config in fits
    codes = P.quantize_uniform(x, t.per_sample(t.s_inv, 3), t.per_sample(t.zero, 3), 8, None, -1)
    assert torch.equal(y, linear_acc_ref(codes, w, t).float())


def test_default_policy_sends_codes_and_keeps_floats_on_tl_dot(gen, monkeypatch):
    monkeypatch.setattr(G, "WGMMA", "codes")
    calls, real = [], W.launch
    monkeypatch.setattr(W, "launch", lambda *a: calls.append(a[0].dtype) or real(*a))
    t = Tables(gen, groups=2, batch=1, bits=8, device="cuda", unit_scale=True)
    w = rand_int(gen, (64, 256), 8, "cuda")
    w_q, w_sum = prepare_linear_weight(w, 8)
    a = rand_int(gen, (96, 256), 8, "cuda")
    for inp in (a, torch.randn(96, 256, generator=gen).to(torch.bfloat16).cuda()):
        qlinear(inp, w_q, w_sum, torch.ones(64, device="cuda"), None, t.s_inv, t.scale, t.zero, t.group,
                out_dtype=torch.float32)
    assert calls == [torch.int8]
    assert torch.equal(qlinear(a, w_q, w_sum, torch.ones(64, device="cuda"), None, t.s_inv, t.scale, t.zero, t.group,
                               out_dtype=torch.float32), linear_acc_ref(a, w, t).float())


def test_small_m_and_unaligned_rows_stay_on_the_tl_dot_kernel(gen, wgmma):
    t = Tables(gen, groups=2, batch=1, bits=8, device="cuda", unit_scale=True)
    for M, K, bits in ((32, 256, 8), (96, 200, 4)):  # 200 → 200-byte codes and 100-byte int4 rows
        w_q, w_sum = prepare_linear_weight(rand_int(gen, (64, K), bits, "cuda"), bits)
        qlinear(rand_int(gen, (M, K), 8, "cuda"), w_q, w_sum, torch.ones(64, device="cuda"), None,
                t.s_inv, t.scale, t.zero, t.group, out_dtype=torch.float32)
    assert wgmma == []
