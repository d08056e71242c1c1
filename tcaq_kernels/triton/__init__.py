"""Triton kernels of the `triton` backend (wrappers and custom ops: `tcaq_kernels.ops.triton_ops`).

numerics.py — the activation quantizers as device functions, shared by every kernel;
quantize.py — activation quantize (uniform / log2, TCR 1/r, per-sample timestep group, int8 / int4);
groupnorm.py — GroupNorm + SiLU + uniform quantize in one pass (a ResBlock's conv input, NHWC codes);
gemm.py     — W8A8 / W4A8 GEMM with the zero-point, scale, bias and residual epilogue;
conv.py     — implicit-GEMM conv2d on NHWC codes with the same epilogue.
"""
