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


# csrc/sm90/: CUTLASS 3 kernels for Hopper, a library of their own (torch.ops.tcaq_sm90) built only for sm_90a.
# -DNDEBUG: CUTLASS's device asserts would be calls inside the mainloop, which make ptxas serialize the wgmmas.
SM90_FLAGS = NVCC_FLAGS + ["-DNDEBUG", "-gencode=arch=compute_90a,code=sm_90a"]


def cutlass_include_dirs() -> list[str]:
    """The CUTLASS / CuTe headers of the `nvidia-cutlass` wheel (its `cutlass_library` package), or [] without it."""
    try:
        import cutlass_library
    except ImportError:
        return []
    root = Path(cutlass_library.__file__).resolve().parent / "source"
    dirs = [root / "include", root / "tools" / "util" / "include"]
    return [str(d) for d in dirs] if all(d.is_dir() for d in dirs) else []


@functools.lru_cache(maxsize=None)
def load_sm90() -> None:
    """Make `torch.ops.tcaq_sm90.*` available: the installed `tcaq_kernels._C_sm90`, or a JIT build of csrc/sm90
    against the nvidia-cutlass headers (raises, saying what is missing, where neither can be had)."""
    if not torch.cuda.is_available() or torch.cuda.get_device_capability() != (9, 0):
        raise RuntimeError("the sm_90a CUTLASS ops need a Hopper GPU (compute capability 9.0)")
    try:
        import tcaq_kernels._C_sm90  # noqa: F401  (registers the ops)

        return
    except ImportError:
        pass
    include = cutlass_include_dirs()
    if not include:
        raise RuntimeError("building csrc/sm90 needs the CUTLASS headers: pip install nvidia-cutlass")
    from torch.utils.cpp_extension import load as jit_load

    sources = sorted(str(p) for p in (CSRC / "sm90").glob("*.cu"))
    jit_load(name="tcaq_kernels_C_sm90", sources=sources, extra_cuda_cflags=SM90_FLAGS, extra_include_paths=include,
             is_python_module=False)


def row_tables(rows: int, scale: torch.Tensor, zero: torch.Tensor, group: torch.Tensor, rows_per_sample: int,
               group_stride: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(z, s_a) of each of `rows` GEMM rows — row m belongs to sample m // rows_per_sample, whose timestep group
    is group[sample · group_stride] (stride 0: one group for all) — gathered on the device, no host sync. The
    vectors are views of buffers padded to a multiple of 4 entries: the W4A8 kernel reads them as its problem's
    row vectors in 16-byte pieces, the last of which may pass `rows`."""
    padded = -(-rows // 4) * 4
    sample = torch.arange(padded, device=group.device).clamp(max=rows - 1) // rows_per_sample
    g = group.reshape(-1)[sample * group_stride].long()
    return zero[g].to(torch.int32)[:rows], scale[g].to(torch.float32)[:rows]


def gemm_sm90(a: torch.Tensor, w: torch.Tensor, w_sum: torch.Tensor, w_scale: torch.Tensor,
              bias: Optional[torch.Tensor], zero_row: torch.Tensor, scale_row: torch.Tensor,
              out: Optional[torch.Tensor] = None, tile: str = "auto") -> torch.Tensor:
    """bf16 [M, N] = s_w[n]·s_a[m]·(Σ_k a·w − z[m]·Σw[n]) + bias[n] for int8 codes a [M, K] and weights w —
    int8 [N, K] or `pack_int4`'s uint8 [N, ⌈K/2⌉] (`prepare_linear_weight`'s operands) — on the CUTLASS kernels
    (csrc/sm90; the epilogue in the Triton kernels' order). `zero_row` / `scale_row`: per-row tables
    (`row_tables`); K % 16 == 0 (int4: 32) and N % 8 == 0 (TMA alignment); `tile`: "auto", or for int8 weights
    "128x128", "64x128" (pingpong) or "128x256", for int4 "128x128"."""
    load_sm90()
    if out is None:
        out = torch.empty(a.shape[0], w.shape[0], dtype=torch.bfloat16, device=a.device)
    bias32 = None if bias is None else bias.to(torch.float32).contiguous()
    return torch.ops.tcaq_sm90.gemm_out(a.contiguous(), w.contiguous(), w_sum.to(torch.int32).contiguous(),
                                        w_scale.to(torch.float32).contiguous(), bias32, zero_row, scale_row, out,
                                        tile)
