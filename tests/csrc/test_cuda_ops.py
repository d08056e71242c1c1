"""csrc/: it compiles with nvcc wherever nvcc exists (CI too), and on a GPU it is bit-exact."""
from __future__ import annotations

import concurrent.futures
import shutil
import subprocess
import sysconfig
from pathlib import Path

import pytest
import torch
import triton
from torch.utils.cpp_extension import COMMON_NVCC_FLAGS

from tcaq_kernels.ops import cuda_ext
from tcaq_kernels.quant.primitives import quantize_uniform

CSRC = Path(__file__).resolve().parents[2] / "csrc"


def _torch_includes(tmp_path) -> list:
    """Include dirs to compile an extension source against this (possibly CPU-only) torch."""
    torch_dir = Path(torch.__file__).parent
    # A CPU build of torch ships the c10/cuda headers but not the one its CUDA build generates at
    # configure time; supply it as a CUDA build would (shared libraries) to compile against them.
    generated = tmp_path / "generated" / "c10" / "cuda" / "impl"
    generated.mkdir(parents=True)
    (generated / "cuda_cmake_macros.h").write_text("#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n")
    return [torch_dir / "include", torch_dir / "include/torch/csrc/api/include", sysconfig.get_paths()["include"],
            tmp_path / "generated"]


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not installed")
def test_cuda_sources_compile_for_hopper(tmp_path):
    includes = _torch_includes(tmp_path)
    for source in sorted(CSRC.glob("*.cu")):
        cmd = ["nvcc", "-c", str(source), "-o", str(tmp_path / (source.stem + ".o")), "-std=c++17",
               "--expt-relaxed-constexpr", "-gencode=arch=compute_90a,code=sm_90a"]
        cmd += [f"-I{p}" for p in includes]
        result = subprocess.run(cmd, capture_output=True, text=True)
        assert result.returncode == 0, f"{source.name} failed to compile:\n{result.stderr[-4000:]}"
        assert (tmp_path / (source.stem + ".o")).stat().st_size > 0


@pytest.mark.skipif(shutil.which("nvcc") is None or not cuda_ext.cutlass_include_dirs(),
                    reason="needs nvcc and the nvidia-cutlass headers")
def test_cutlass_gemm_compiles_to_unserialized_wgmma_and_tma(tmp_path):
    """csrc/sm90 with the flags the builds use (torch's COMMON_NVCC_FLAGS, which turn off CUDA's half / bfloat16
    operators, then cuda_ext.SM90_FLAGS): every file compiles (two at a time), ptxas does not serialize a tile's
    wgmmas (warning C7510, which CUTLASS's device asserts cause without -DNDEBUG), and each tile's machine code
    has integer wgmma (IGMMA) and TMA loads; linked as one library, the tile entry points resolve."""
    includes = _torch_includes(tmp_path) + [Path(d) for d in cuda_ext.cutlass_include_dirs()]
    sources = sorted((CSRC / "sm90").glob("*.cu"))
    tiles = [s for s in sources if s.stem.startswith(("gemm_w8a8_", "gemm_w4a8_"))]
    assert len(tiles) == 4 and len(sources) == 5

    def compile_one(source):
        obj = tmp_path / (source.stem + ".o")
        cmd = ["nvcc", "-c", str(source), "-o", str(obj), "-Xcompiler", "-fPIC", *COMMON_NVCC_FLAGS,
               *cuda_ext.SM90_FLAGS, "-DTORCH_EXTENSION_NAME=tcaq_kernels_C_sm90", *(f"-I{p}" for p in includes)]
        return source, subprocess.run(cmd, capture_output=True, text=True)

    cuobjdump = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        for source, result in pool.map(compile_one, sources):
            assert result.returncode == 0, f"{source.name} failed to compile:\n{result.stderr[-4000:]}"
            assert "C7510" not in result.stderr, result.stderr[-2000:]
            if source in tiles:
                obj = tmp_path / (source.stem + ".o")
                sass = subprocess.run([str(cuobjdump), "-sass", str(obj)], capture_output=True, text=True,
                                      check=True).stdout
                assert "IGMMA" in sass and "UTMALDG" in sass, f"{source.name}: no integer wgmma / TMA load in its SASS"
    # the dispatcher's tile entry points resolve within the library (torch's own symbols stay undefined here)
    lib = tmp_path / "libsm90.so"
    linked = subprocess.run(["nvcc", "-shared", "-o", str(lib), *(str(tmp_path / (s.stem + ".o")) for s in sources)],
                            capture_output=True, text=True)
    assert linked.returncode == 0, linked.stderr[-3000:]
    undefined = subprocess.run(["nm", "-C", "--undefined-only", str(lib)], capture_output=True, text=True,
                               check=True).stdout
    assert "tcaq::sm90" not in undefined, [line for line in undefined.splitlines() if "tcaq::sm90" in line]


def test_row_tables_follow_each_rows_sample():
    """Row m of a GEMM over B samples × L rows takes its sample's group's (z, s_a); stride 0: one group."""
    scale, zero = torch.tensor([0.5, 0.25, 2.0]), torch.tensor([3, -7, 11], dtype=torch.int32)
    group = torch.tensor([2, 0, 1, 2], dtype=torch.int32)
    z, s = cuda_ext.row_tables(12, scale, zero, group, 3, 1)
    assert z.tolist() == [11] * 3 + [3] * 3 + [-7] * 3 + [11] * 3 and z.dtype == torch.int32
    assert s.tolist() == [2.0] * 3 + [0.5] * 3 + [0.25] * 3 + [2.0] * 3 and s.dtype == torch.float32
    z, s = cuda_ext.row_tables(5, scale, zero, torch.tensor(1, dtype=torch.int32), 5, 0)
    assert z.tolist() == [-7] * 5 and s.tolist() == [0.25] * 5


@pytest.mark.cuda
@pytest.mark.parametrize("shape,channel_dim", [((3, 17, 5, 7), 1), ((2, 33, 40), -1), ((4, 3, 32, 32), 1)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_quantize_act_bit_exact(shape, channel_dim, dtype):
    g = torch.Generator(device="cuda").manual_seed(int(torch.randint(0, 2**31 - 1, ())))
    x = (torch.randn(shape, device="cuda", generator=g) * 4).to(dtype)
    channels = shape[channel_dim]
    s_inv = torch.rand(5, device="cuda", generator=g) * 40 + 1
    zero = torch.randint(-20, 20, (5,), device="cuda", generator=g, dtype=torch.int32)
    group = torch.randint(0, 5, (shape[0],), device="cuda", generator=g, dtype=torch.int32)
    r_inv = torch.rand(channels, device="cuda", generator=g) + 0.25
    view = [shape[0]] + [1] * (len(shape) - 1)
    for bits in (8, 4):
        expect = quantize_uniform(x, s_inv[group].view(view), zero[group].view(view), bits, r_inv, channel_dim)
        outs = []
        for poison in (85, -86):  # two poisons: an unwritten element cannot match both runs
            out = torch.full(shape, poison, dtype=torch.int8, device="cuda")
            outs.append(cuda_ext.quantize_act(x, s_inv, zero, group, bits, r_inv, channel_dim, out=out).clone())
        assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], expect)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() != (9, 0),
                    reason="needs an sm_90 GPU")
@pytest.mark.parametrize("bits,tile", [(8, "auto"), (8, "128x128"), (8, "64x128"), (8, "128x256"), (4, "auto")])
@pytest.mark.parametrize("B,L,K,N", [(2, 100, 96, 72), (4, 256, 1280, 320), (2, 77, 768, 640), (1, 8192, 320, 2560)])
def test_cutlass_gemm_matches_the_triton_kernel(B, L, K, N, bits, tile):
    """The CUTLASS GEMMs (csrc/sm90; int8 weights, and packed int4 widened in registers) give the Triton
    `qlinear`'s bf16 outputs bit for bit — the same integer sum and the same epilogue order — with per-sample
    timestep groups, M not a tile multiple, and a poisoned output (two poisons: an unwritten element cannot
    match both runs)."""
    from tcaq_kernels.ops.triton_ops import prepare_linear_weight, qlinear

    g = torch.Generator(device="cuda").manual_seed(int(torch.randint(0, 2**31 - 1, ())))
    lo, hi = (-128, 128) if bits == 8 else (-8, 8)
    a = torch.randint(-128, 128, (B, L, K), device="cuda", dtype=torch.int8, generator=g)
    w = torch.randint(lo, hi, (N, K), device="cuda", dtype=torch.int8, generator=g)
    w_q, w_sum = prepare_linear_weight(w, bits)
    w_scale = torch.rand(N, device="cuda", generator=g) * 1e-2 + 1e-4
    bias = torch.randn(N, device="cuda", generator=g).to(torch.bfloat16)
    scale = torch.rand(4, device="cuda", generator=g) * 0.2 + 0.05
    s_inv = 1.0 / scale
    zero = torch.randint(-32, 32, (4,), device="cuda", dtype=torch.int32, generator=g)
    group = torch.randint(0, 4, (B,), device="cuda", dtype=torch.int32, generator=g)
    expect = qlinear(a, w_q, w_sum, w_scale, bias, s_inv, scale, zero, group).reshape(B * L, N)
    z_row, s_row = cuda_ext.row_tables(B * L, scale, zero, group, L, 1)
    outs = []
    for poison in (float("nan"), 3.0):
        out = torch.full((B * L, N), poison, device="cuda", dtype=torch.bfloat16)
        outs.append(cuda_ext.gemm_sm90(a.reshape(B * L, K), w_q, w_sum, w_scale, bias, z_row, s_row, out,
                                       tile).clone())
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], expect)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() != (9, 0),
                    reason="needs an sm_90 GPU")
@pytest.mark.parametrize("bits", [8, 4])
def test_the_cutlass_route_of_qlinear_changes_no_bit(monkeypatch, bits):
    """TCAQ_CUTLASS_GEMM=1 (forced here for any size): a float-input `qlinear` of 3 samples × 70 rows (quantized
    first, int4 weights widened) runs on the CUTLASS GEMM and gives the Triton route's bf16 outputs bit for bit;
    a call with a residual stays on Triton."""
    from tcaq_kernels.ops.triton_ops import prepare_linear_weight, qlinear
    from tcaq_kernels.triton import gemm as G

    g = torch.Generator(device="cuda").manual_seed(int(torch.randint(0, 2**31 - 1, ())))
    B, L, K, N = 3, 70, 96, 72
    lo, hi = (-128, 128) if bits == 8 else (-8, 8)
    x = (torch.randn(B, L, K, device="cuda", generator=g) * 2).to(torch.bfloat16)
    w_q, w_sum = prepare_linear_weight(torch.randint(lo, hi, (N, K), device="cuda", dtype=torch.int8, generator=g),
                                       bits)
    w_scale = torch.rand(N, device="cuda", generator=g) * 1e-2 + 1e-4
    bias = torch.randn(N, device="cuda", generator=g)
    scale = torch.rand(4, device="cuda", generator=g) * 0.2 + 0.05
    zero = torch.randint(-32, 32, (4,), device="cuda", dtype=torch.int32, generator=g)
    group = torch.randint(0, 4, (B,), device="cuda", dtype=torch.int32, generator=g)
    residual = torch.randn(B, L, N, device="cuda", generator=g).to(torch.bfloat16)
    call = lambda res=None: qlinear(x, w_q, w_sum, w_scale, bias, 1.0 / scale, scale, zero, group, residual=res)
    expect, expect_res = call(), call(residual)
    calls = []
    gemm_sm90 = cuda_ext.gemm_sm90
    monkeypatch.setattr(cuda_ext, "gemm_sm90", lambda *a, **k: calls.append(1) or gemm_sm90(*a, **k))
    monkeypatch.setattr(G, "CUTLASS", True)
    monkeypatch.setattr(G, "CUTLASS_MIN_MNK", 0)
    assert torch.equal(call(), expect) and len(calls) == 1
    assert torch.equal(call(residual), expect_res) and len(calls) == 1
