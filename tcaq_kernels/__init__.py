"""tcaq-kernels: TCAQ-DM post-training quantization of diffusion UNets on real integer kernels.

Public API: `calibrate` → `CalibState` (`save`/`load`/`validate`) → `convert` → a drop-in UNet, and
`cuda_graphed` to replay it from CUDA graphs inside a pipeline.
"""
from .calib import calibrate
from .convert import convert
from .graphs import cuda_graphed
from .quant.state import CalibState, CalibStateError

__version__ = "0.1.0"


def load_state(path) -> CalibState:
    """Load a CalibState file (integrity-checked)."""
    return CalibState.load(path)


__all__ = ["CalibState", "CalibStateError", "calibrate", "convert", "cuda_graphed", "load_state", "__version__"]
