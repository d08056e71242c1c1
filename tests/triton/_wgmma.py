"""Shared set-up of the Gluon wgmma kernel tests (GEMM and conv)."""
import pytest
import torch

from tcaq_kernels.triton import gemm as G

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
