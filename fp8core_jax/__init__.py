"""fp8core_jax: the JAX backend of fp8core.

Quantizers bit-identical to :mod:`fp8core.reference` (docs/numerics.md), FP8
matmuls with custom VJPs (§6), Flax NNX layers (:mod:`fp8core_jax.nn`) and
weight transfer from PyTorch state dicts (:mod:`fp8core_jax.transfer`, numpy
only — torch is never imported here).
"""

from fp8core_jax.matmul import matmul_fp8_global, matmul_fp8_mixed
from fp8core_jax.quantize import (
    NATIVE_CAST_FORMATS,
    dequantize_blockwise,
    dequantize_global,
    fake_quantize,
    quantize_blockwise,
    quantize_global,
)

__all__ = [
    "NATIVE_CAST_FORMATS",
    "dequantize_blockwise",
    "dequantize_global",
    "fake_quantize",
    "matmul_fp8_global",
    "matmul_fp8_mixed",
    "quantize_blockwise",
    "quantize_global",
]
