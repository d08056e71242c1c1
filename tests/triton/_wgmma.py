"""Shared set-up of the Gluon wgmma kernel tests (GEMM and conv)."""
import pytest
import torch

from tcaq_kernels.ops.triton_ops import prepare_linear_weight, qlinear
from tcaq_kernels.triton import gemm as G

from _tables import Tables, linear_acc_ref, rand_int

#: the Gluon kernels are sm_90 code and do not run in Triton's interpreter
NEEDS_SM90 = [pytest.mark.cuda, pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.get_device_capability() != (9, 0), reason="needs an sm_90 GPU")]


def route_to_wgmma(monkeypatch, module, launcher: str, config_index: int, keep_prune: bool = False) -> list:
    """Switch the routing on, force config `config_index` of `module._tuned` (its prune off unless
    `keep_prune`, so the config meets every shape; list and cache restored by monkeypatch), and spy on
    `module.<launcher>`: the returned list gets an entry for every call that reached the Gluon kernel."""
    monkeypatch.setattr(G, "WGMMA", "all")
    monkeypatch.setattr(module._tuned, "configs", [module._tuned.configs[config_index]])
    monkeypatch.setattr(module._tuned, "cache", {})
    if not keep_prune:
        monkeypatch.setattr(module._tuned, "early_config_prune", None)
    calls, real = [], getattr(module, launcher)
    monkeypatch.setattr(module, launcher, lambda *a: calls.append(1) or real(*a))
    return calls


def check_codes_accumulator(gen, calls: list, shape: tuple, w_bits: int) -> None:
    """int8 codes [B, L, K] through `qlinear` with unit scales and fp32 output: float(int32 accumulator −
    z·Σw) must equal the reference exactly, and the call must have reached the spied kernel."""
    B, L, K, N = shape
    a, w = rand_int(gen, (B, L, K), 8, "cuda"), rand_int(gen, (N, K), w_bits, "cuda")
    t = Tables(gen, groups=4, batch=B, bits=8, device="cuda", unit_scale=True)
    w_q, w_sum = prepare_linear_weight(w, w_bits)
    y = qlinear(a, w_q, w_sum, torch.ones(N, device="cuda"), None, t.s_inv, t.scale, t.zero, t.group,
                out_dtype=torch.float32)
    assert calls == [1]
    assert torch.equal(y, linear_acc_ref(a, w, t).float())
