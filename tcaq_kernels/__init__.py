"""tcaq-kernels: TCAQ-DM post-training quantization of diffusion UNets on real integer kernels.

Public API: `calibrate` → `CalibState` (`save`/`load`/`validate`) → `convert` → a drop-in UNet.
"""
from .calib import calibrate
from .convert import convert
from .quant.state import CalibState, CalibStateError

__version__ = "0.1.0"


def load_state(path) -> CalibState:
    """Load a CalibState file (integrity-checked)."""
    return CalibState.load(path)


__all__ = ["CalibState", "CalibStateError", "calibrate", "convert", "load_state", "__version__"]
