"""Build script. The CUDA extension in csrc/ is optional: it is built only where a CUDA-enabled
torch and nvcc are present at build time (use `pip install -e . --no-build-isolation` so the build
sees your torch); everywhere else the package installs as pure Python with the reference, simulate
and Triton backends.
"""
import os
from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).resolve().parent


def cuda_extensions():
    if os.environ.get("TCAQ_NO_CUDA") == "1":
        return [], {}
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension
    except ImportError:
        return [], {}
    sources = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc").glob("*.cu"))
    if not sources or torch.version.cuda is None or CUDA_HOME is None:
        return [], {}
    cuda_ext = _cuda_ext_module()
    exts = [CUDAExtension(
        "tcaq_kernels._C",
        sources + sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc").glob("*.cpp")),
        extra_compile_args={"cxx": ["-O3", "-std=c++17"], "nvcc": cuda_ext.NVCC_FLAGS},
    )]
    include = cuda_ext.cutlass_include_dirs()
    if include:  # csrc/sm90: CUTLASS kernels for Hopper, sm_90a only (an explicit -gencode replaces torch's arch list)
        exts.append(CUDAExtension(
            "tcaq_kernels._C_sm90",
            sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc" / "sm90").glob("*.cu")),
            include_dirs=include,
            extra_compile_args={"cxx": ["-O3", "-std=c++17"], "nvcc": cuda_ext.SM90_FLAGS},
        ))
    return exts, {"build_ext": BuildExtension}


def _cuda_ext_module():
    """`tcaq_kernels/ops/cuda_ext.py` loaded from its file (the package itself imports more than a build has),
    for its nvcc flags and CUTLASS header lookup: one definition for setup.py and the JIT build."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("_tcaq_cuda_ext", ROOT / "tcaq_kernels" / "ops" / "cuda_ext.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


ext_modules, cmdclass = cuda_extensions()

setup(
    name="tcaq-kernels",
    version="0.1.0",
    description="TCAQ-DM quantization of diffusion UNets on real INT8/INT4 kernels",
    long_description=(ROOT / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(include=["tcaq_kernels", "tcaq_kernels.*"]),
    package_data={"tcaq_kernels": ["models/ddpm-cifar10-small/*", "models/ddpm-cifar10-small/*/*"]},
    install_requires=[
        "torch>=2.4",
        "diffusers>=0.30",
        "safetensors>=0.4",
        "numpy>=1.24",
        "pillow>=9",
        "tqdm>=4.60",
        "scipy>=1.10",
    ],
    extras_require={
        # The kernels are developed and measured on Triton 3.6 (the GPU machine's); 3.9's interpreter
        # rejects their int4 masks, so newer releases wait until they are tested.
        "triton": ["triton>=3.6,<3.7"],
        # The CUTLASS / CuTe headers csrc/sm90 builds against (tests compile it wherever nvcc is).
        "cutlass": ["nvidia-cutlass>=4.2,<4.3"],
        # numpy < 2.4: Triton 3.6's interpreter (the CPU test path) breaks on numpy 2.4 (triton-lang/triton#9171)
        "test": ["pytest>=8", "hypothesis>=6.100", "triton>=3.6,<3.7", "numpy<2.4", "nvidia-cutlass>=4.2,<4.3"],
    },
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    entry_points={"console_scripts": ["tcaq=tcaq_kernels.__main__:main"]},
)
