"""fp8core_jax: the JAX backend of fp8core.

Quantizers bit-identical to :mod:`fp8core.reference` (docs/numerics.md), FP8
matmuls with custom VJPs driven by recipes (§6, §9: :func:`matmul_fp8`), Flax NNX
layers (:mod:`fp8core_jax.nn`) and weight transfer from PyTorch state dicts (:mod:`fp8core_jax.transfer`, numpy
only — torch is never imported here).
"""

from fp8core_jax.hadamard import random_hadamard_transform
from fp8core_jax.nvfp4 import dequantize_nvfp4, quantize_nvfp4
from fp8core_jax.matmul import matmul_fp8, matmul_fp8_global, matmul_fp8_mixed
from fp8core_jax.quantize import (
    NATIVE_CAST_FORMATS,
    dequantize_blockwise,
    dequantize_global,
    dequantize_mx,
    dequantize_operand,
    fake_quantize,
    fake_quantize_operand,
    quantize_blockwise,
    quantize_global,
    quantize_mx,
    quantize_operand,
)

__all__ = [
    "NATIVE_CAST_FORMATS",
    "dequantize_blockwise",
    "dequantize_global",
    "dequantize_mx",
    "dequantize_nvfp4",
    "dequantize_operand",
    "fake_quantize",
    "fake_quantize_operand",
    "matmul_fp8",
    "matmul_fp8_global",
    "matmul_fp8_mixed",
    "quantize_blockwise",
    "quantize_global",
    "quantize_mx",
    "quantize_nvfp4",
    "quantize_operand",
    "random_hadamard_transform",
]
