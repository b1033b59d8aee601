"""fp8core_torch: the PyTorch backend of fp8core (FP8-simulated training).

Quantizers bit-identical to :mod:`fp8core.reference`, one recipe-driven FP8 linear
(``matmul_fp8``, ``LinearFP8``; :mod:`fp8core.recipe`), bitsandbytes' matmuls and
layers as two of its presets, and ``convert_to_fp8``. Device-agnostic: every tensor is
created on its input's device.

Layout (after torchao.float8): ``config`` (per-codebook constants, frozen),
``quantize`` (the quantizers), ``matmul`` (autograd functions), ``linear``
(modules), ``conv1d`` (transformers' Conv1D), ``convert`` (``convert_to_fp8``).
"""

from fp8core_torch.config import QuantSpec
from fp8core_torch.conv1d import Conv1DFP8
from fp8core_torch.convert import convert_to_fp8
from fp8core_torch.hadamard import random_hadamard_transform
from fp8core_torch.linear import LinearFP8, LinearFP8Global, LinearFP8Mixed
from fp8core_torch.nvfp4 import dequantize_nvfp4, quantize_nvfp4
from fp8core_torch.matmul import matmul_fp8, matmul_fp8_global, matmul_fp8_mixed
from fp8core_torch.quantize import (
    dequantize_blockwise,
    dequantize_global,
    dequantize_mx,
    dequantize_operand,
    empty_cache,
    fake_quantize,
    fake_quantize_operand,
    quantize_blockwise,
    quantize_global,
    quantize_mx,
    quantize_operand,
)

__all__ = [
    "Conv1DFP8",
    "LinearFP8",
    "LinearFP8Global",
    "LinearFP8Mixed",
    "QuantSpec",
    "convert_to_fp8",
    "dequantize_blockwise",
    "dequantize_global",
    "dequantize_mx",
    "dequantize_nvfp4",
    "dequantize_operand",
    "empty_cache",
    "fake_quantize",
    "fake_quantize_operand",
    "matmul_fp8",
    "matmul_fp8_global",
    "matmul_fp8_mixed",
    "quantize_blockwise",
    "quantize_global",
    "quantize_mx",
    "quantize_nvfp4",
    "random_hadamard_transform",
    "quantize_operand",
]
