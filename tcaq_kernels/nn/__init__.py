"""Quantized modules that `convert` swaps into a diffusers UNet."""
from .qattention import ExplicitAttnProcessor, QAttnProcessor
from .qlayers import BACKENDS, QConv2d, QLinear
from .timestep import TimestepGroups

__all__ = ["BACKENDS", "ExplicitAttnProcessor", "QAttnProcessor", "QConv2d", "QLinear", "TimestepGroups"]
