"""The CUDA C++ ops of csrc/: use the installed `tcaq_kernels._C`, or JIT-build it once.

`pip install -e . --no-build-isolation` on a machine with a CUDA torch and nvcc builds `_C`; without
it, `load()` compiles csrc/ with torch.utils.cpp_extension into torch's extension cache.
"""
from __future__ import annotations

import functools
from pathlib import Path
from typing import Optional

import torch

CSRC = Path(__file__).resolve().parents[2] / "csrc"
NVCC_FLAGS = ["-O3", "-std=c++17", "--expt-relaxed-constexpr"]


@functools.lru_cache(maxsize=None)
def load() -> None:
    """Make `torch.ops.tcaq_cuda.*` available (raises with the build log when it cannot)."""
    if not torch.cuda.is_available():
        raise RuntimeError("the CUDA ops need a CUDA device and a CUDA build of torch")
    try:
        import tcaq_kernels._C  # noqa: F401  (registers the ops)

        return
    except ImportError:
        pass
    from torch.utils.cpp_extension import load as jit_load

    sources = sorted(str(p) for p in CSRC.glob("*.cu")) + sorted(str(p) for p in CSRC.glob("*.cpp"))
    if not sources:
        raise RuntimeError(f"no CUDA sources found in {CSRC} (is this an installed wheel without csrc/?)")
    jit_load(name="tcaq_kernels_C", sources=sources, extra_cuda_cflags=NVCC_FLAGS, is_python_module=False)


def quantize_act(x: torch.Tensor, s_inv: torch.Tensor, zero: torch.Tensor, group: torch.Tensor, bits: int,
                 r_inv: Optional[torch.Tensor] = None, channel_dim: int = 1, out: Optional[torch.Tensor] = None):
    """CUDA twin of `primitives.quantize_uniform` with per-sample tables (see csrc/quantize_act.cu)."""
    load()
    if out is None:
        out = torch.empty(x.shape, dtype=torch.int8, device=x.device)
    return torch.ops.tcaq_cuda.quantize_act_out(x.contiguous(), s_inv, zero, group.to(torch.int32), r_inv, bits,
                                                channel_dim, out)
