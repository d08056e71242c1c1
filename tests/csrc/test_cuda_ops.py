"""csrc/: it compiles with nvcc wherever nvcc exists (CI too), and on a GPU it is bit-exact."""
from __future__ import annotations

import shutil
import subprocess
import sysconfig
from pathlib import Path

import pytest
import torch

from tcaq_kernels.quant.primitives import quantize_uniform

CSRC = Path(__file__).resolve().parents[2] / "csrc"


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not installed")
def test_cuda_sources_compile_for_hopper(tmp_path):
    torch_dir = Path(torch.__file__).parent
    # A CPU build of torch ships the c10/cuda headers but not the one its CUDA build generates at
    # configure time; supply it as a CUDA build would (shared libraries) to compile against them.
    generated = tmp_path / "generated" / "c10" / "cuda" / "impl"
    generated.mkdir(parents=True)
    (generated / "cuda_cmake_macros.h").write_text("#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n")
    includes = [torch_dir / "include", torch_dir / "include/torch/csrc/api/include", sysconfig.get_paths()["include"],
                tmp_path / "generated"]
    for source in sorted(CSRC.glob("*.cu")):
        cmd = ["nvcc", "-c", str(source), "-o", str(tmp_path / (source.stem + ".o")), "-std=c++17",
               "--expt-relaxed-constexpr", "-gencode=arch=compute_90a,code=sm_90a"]
        cmd += [f"-I{p}" for p in includes]
        result = subprocess.run(cmd, capture_output=True, text=True)
        assert result.returncode == 0, f"{source.name} failed to compile:\n{result.stderr[-4000:]}"
        assert (tmp_path / (source.stem + ".o")).stat().st_size > 0


@pytest.mark.cuda
@pytest.mark.parametrize("shape,channel_dim", [((3, 17, 5, 7), 1), ((2, 33, 40), -1), ((4, 3, 32, 32), 1)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_quantize_act_bit_exact(shape, channel_dim, dtype):
    from tcaq_kernels.ops import cuda_ext

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
