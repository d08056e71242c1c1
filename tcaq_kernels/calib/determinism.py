"""Bit-reproducible calibration on the GPU, opt-in (`MethodConfig.deterministic`).

Why: two GPU calibrations of one configuration and seed are not the same calibration. Block k's
reconstruction runs backward passes whose reductions (cuDNN weight gradients, atomics) sum in a
different order each run; block k+1 is initialised from block k's outputs, so a near-tie in the TCR
strength search, the DAQ choice or an activation MSE search flips and the runs drift apart. Measured
(27 Nov, H200, 10k samples): `tcaq` W4A4, seed 1,000,000, twice after round 0 — TCR strength counts
14/13/26/7/3 against 15/13/23/10/2 over the 63 layers and FID-ResNet56 12.11 against 16.46. A row of
the quality table is then one draw, and comparing two presets needs several. With this switch torch
uses only deterministic kernels (cuDNN's deterministic algorithms, cuBLAS with a fixed workspace), at
some speed cost; an op without a deterministic kernel raises instead of drifting.

On the CPU the calibration is reproducible already; the switch changes nothing there.
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Iterator

import torch

#: cuBLAS needs a fixed workspace split for reproducible GEMMs (CUDA ≥ 10.2); ":4096:8" is one of the two
#: values torch accepts. Read when cuBLAS runs, so it has to be in the environment before the first GEMM of
#: the process for the setting to apply to every handle.
CUBLAS_WORKSPACE = ":4096:8"


@contextmanager
def deterministic_algorithms(enabled: bool) -> Iterator[None]:
    """Run the body with torch's deterministic algorithms (and cuDNN's) when `enabled`; restore the
    process's settings afterwards, whatever happens in the body."""
    if not enabled:
        yield
        return
    before = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
              torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark)
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_WORKSPACE)
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    try:
        yield
    except RuntimeError as e:
        if "deterministic" in str(e):
            raise RuntimeError(f"calibration option deterministic=True: {e} — calibrate with deterministic=False "
                               "(reproducible only up to the GPU's reduction order) or report the op") from e
        raise
    finally:
        torch.use_deterministic_algorithms(before[0], warn_only=before[1])
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = before[2], before[3]
